"""`student serve`'s flags: each sets one settings field, whose description and default are its help."""

from __future__ import annotations

import argparse

from server.runtime.serve import add_arguments, settings_from_args
from server.runtime.serve_flags import FLAGS, default_text, flag_overrides, help_text, option_rows
from server.runtime.settings import Settings


def parser() -> argparse.ArgumentParser:
    built = argparse.ArgumentParser()
    add_arguments(built)
    return built


def test_every_flag_sets_a_described_settings_field() -> None:
    for flag in FLAGS:
        assert flag.setting in Settings.model_fields, flag
        assert Settings.model_fields[flag.setting].description, f"{flag.setting} has no description"


def test_help_is_the_description_and_the_default_from_the_settings() -> None:
    by_dest = {action.dest: action for action in parser()._actions}
    for flag in FLAGS:
        help_shown = by_dest[flag.dest].help
        assert help_shown == help_text(flag)
        default = default_text(flag.setting)
        if default is not None and flag.name != "--no-telemetry":
            assert help_shown.endswith(f"(default: {default})"), help_shown
    assert default_text("drain_timeout_s") == "30" and default_text("telemetry") == "on"
    assert default_text("max_in_flight") is None  # "2 x max-num-seqs", which the description says


def test_only_passed_flags_override_and_they_reach_the_settings() -> None:
    args = parser().parse_args(["--port", "9100", "--no-telemetry", "--route-keyword", "giá"])
    assert flag_overrides(args) == {"port": 9100, "telemetry": False, "route_keywords": ["giá"]}
    settings = settings_from_args(args)
    assert (settings.port, settings.telemetry, settings.route_keywords) == (9100, False, ["giá"])


def test_energy_exporters_are_a_repeatable_flag() -> None:
    args = parser().parse_args([
        "--upstream", "http://gpu1:8001", "--upstream", "http://gpu2:8001",
        "--energy-exporter", "http://gpu1:8001=http://gpu1:9400#0",
        "--energy-exporter", "http://gpu2:8001=http://gpu2:9400",
    ])  # fmt: skip
    settings = settings_from_args(args)
    assert {replica: str(target) for replica, target in settings.energy_exporters.items()} == {
        "http://gpu1:8001": "http://gpu1:9400/metrics#0",
        "http://gpu2:8001": "http://gpu2:9400/metrics",
    }
    assert default_text("energy_exporters") is None  # the description says what happens without one


def test_the_docs_table_has_a_row_per_flag_with_its_environment_variable() -> None:
    rows = list(option_rows())
    assert [row[0] for row in rows] == [flag.name for flag in FLAGS]
    drain = next(row for row in rows if row[0] == "--drain-timeout-s")
    assert drain[:3] == ("--drain-timeout-s", "STUDENT_DRAIN_TIMEOUT_S", "30")
