"""Power sources: RAPL against a powercap tree made on disk, the real NVML failing for real here."""

from __future__ import annotations

from pathlib import Path

import pytest

import server.telemetry.power_sources
from server.telemetry.power_sources import (
    NvmlSource,
    RaplSource,
    Reading,
    TraceSource,
    UnavailableSource,
    cuda_visible_devices,
    detect_power_source,
)


def _nvml_starts() -> bool:
    """True on a machine with a working NVIDIA driver (the real library, no mock)."""
    source = NvmlSource()
    try:
        return source.status == "ok"
    finally:
        source.close()


NVML_STARTS = _nvml_starts()


def _domain(root: Path, directory: str, name: str, energy_uj: int, max_range_uj: int = 262_143_328_850) -> Path:
    path = root / directory
    path.mkdir(parents=True)
    (path / "name").write_text(name + "\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return path


@pytest.fixture
def powercap(tmp_path: Path) -> Path:
    """Two packages, plus domains that must not count: a sub-domain, psys, and the MMIO copy."""
    root = tmp_path / "powercap"
    _domain(root, "intel-rapl:0", "package-0", 1_250_000)
    _domain(root, "intel-rapl:0:0", "package-0", 999_000_000)  # skipped by its path, whatever its name
    _domain(root, "intel-rapl:1", "package-1", 2_500_000)
    _domain(root, "intel-rapl:2", "psys", 7_000_000)
    _domain(root, "intel-rapl-mmio:0", "package-0", 5_000_000)
    return root


def test_public_surface_is_exactly_all() -> None:
    assert set(server.telemetry.power_sources.__all__) == {
        "NvmlSource",
        "PowerSource",
        "RaplSource",
        "Reading",
        "SourceStatus",
        "SteadySource",
        "TraceSource",
        "UnavailableSource",
        "cuda_visible_devices",
        "detect_power_source",
    }


def test_rapl_sums_package_domains_only_in_joules(powercap: Path) -> None:
    source = RaplSource(powercap)
    assert (source.name, source.status) == ("rapl", "ok")
    assert "2 CPU package(s)" in source.reason
    reading = source.read()
    assert reading.energy_j == pytest.approx(3.75)  # (1_250_000 + 2_500_000) µJ
    assert reading.power_w is None

    (powercap / "intel-rapl:1" / "energy_uj").write_text("4000000\n")
    (powercap / "intel-rapl:0:0" / "energy_uj").write_text("1\n")  # ignored sub-domain
    assert source.read().energy_j == pytest.approx(5.25)


def test_rapl_counter_wrap_adds_the_range_once(tmp_path: Path) -> None:
    package = _domain(tmp_path, "intel-rapl:0", "package-0", 900_000, max_range_uj=1_000_000)
    source = RaplSource(tmp_path)
    assert source.read().energy_j == pytest.approx(0.9)
    (package / "energy_uj").write_text("100000\n")  # wrapped: 900_000 -> 1_000_000 -> 100_000
    assert source.read().energy_j == pytest.approx(1.1)
    (package / "energy_uj").write_text("300000\n")
    assert source.read().energy_j == pytest.approx(1.3)
    (package / "energy_uj").write_text("50000\n")  # wrapped again
    assert source.read().energy_j == pytest.approx(2.05)


def test_rapl_unreadable_counter_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    package = _domain(tmp_path, "intel-rapl:0", "package-0", 1)
    (package / "energy_uj").unlink()
    (package / "energy_uj").mkdir()  # unreadable even for root, unlike chmod
    source = RaplSource(tmp_path)
    assert source.status == "unavailable"
    assert source.reason.startswith(f"no readable RAPL counters under {tmp_path}")
    assert "energy_uj" in source.reason
    assert source.read().energy_j is None


def test_rapl_counter_that_becomes_unreadable_turns_the_source_unavailable(tmp_path: Path) -> None:
    package = _domain(tmp_path, "intel-rapl:0", "package-0", 2_000_000)
    source = RaplSource(tmp_path)
    assert source.read().energy_j == pytest.approx(2.0)
    (package / "energy_uj").unlink()
    reading = source.read()
    assert (reading.energy_j, reading.power_w) == (None, None)
    assert source.status == "unavailable"
    assert "became unreadable" in source.reason


def test_rapl_without_tree_or_packages_is_unavailable(tmp_path: Path) -> None:
    missing = RaplSource(tmp_path / "nowhere")
    assert missing.status == "unavailable"
    assert str(tmp_path / "nowhere") in missing.reason
    _domain(tmp_path, "intel-rapl:0", "psys", 1)
    no_package = RaplSource(tmp_path)
    assert (no_package.status, no_package.reason) == ("unavailable", f"no RAPL package domains under {tmp_path}")


@pytest.mark.skipif(NVML_STARTS, reason="this machine has a working NVIDIA driver")
def test_real_nvml_without_a_driver_is_unavailable_with_a_reason() -> None:
    source = NvmlSource()
    assert (source.name, source.status) == ("nvml", "unavailable")
    assert source.reason == "NVML unavailable: no NVIDIA driver (libnvidia-ml.so not found)"
    assert (source.read().energy_j, source.read().power_w) == (None, None)
    source.close()
    source.close()  # idempotent


@pytest.mark.skipif(NVML_STARTS, reason="this machine has a working NVIDIA driver")
def test_detect_on_a_bare_machine_names_everything_it_tried(tmp_path: Path) -> None:
    source = detect_power_source(rapl_root=tmp_path / "no-powercap")
    assert (source.name, source.status) == ("unavailable", "unavailable")
    assert source.reason == (
        "NVML unavailable: no NVIDIA driver (libnvidia-ml.so not found); "
        f"no readable RAPL counters under {tmp_path / 'no-powercap'} ({tmp_path / 'no-powercap'} does not exist)"
    )
    only_nvml = detect_power_source("nvml")
    assert only_nvml.status == "unavailable" and only_nvml.reason.startswith("NVML unavailable")


@pytest.mark.skipif(NVML_STARTS, reason="this machine has a working NVIDIA driver")
def test_detect_falls_back_to_rapl(powercap: Path) -> None:
    source = detect_power_source(rapl_root=powercap)
    assert (source.name, source.status) == ("rapl", "ok")
    assert source.read().energy_j == pytest.approx(3.75)


def test_detect_none_turns_measuring_off(powercap: Path) -> None:
    source = detect_power_source("none", rapl_root=powercap)
    assert isinstance(source, UnavailableSource)
    assert source.reason == "energy measurement turned off (power source: none)"
    assert detect_power_source("rapl", rapl_root=powercap).name == "rapl"


@pytest.mark.skipif(not NVML_STARTS, reason="needs an NVIDIA GPU and driver")
def test_real_nvml_reads_power_and_a_rising_counter() -> None:
    source = NvmlSource()
    try:
        assert source.status == "ok" and source.device_count >= 1
        first, second = source.read(), source.read()
        assert second.time_s > first.time_s
        assert first.power_w is not None and first.power_w > 0
        if first.energy_j is not None:
            assert second.energy_j is not None and second.energy_j >= first.energy_j > 0
    finally:
        source.close()
    assert source.status == "unavailable"


@pytest.mark.parametrize(
    ("value", "devices"),
    [
        (None, None),
        ("", []),
        ("0,2", [0, 2]),
        ("GPU-8a1c, 1", ["GPU-8a1c", 1]),
        ("0,-1,2", [0]),
        ("MIG-1234", []),
    ],
)
def test_cuda_visible_devices_is_parsed_like_cuda(value: str | None, devices: list | None) -> None:
    assert cuda_visible_devices(value) == devices


def test_trace_source_replays_then_holds_the_last_reading() -> None:
    trace = TraceSource([(0.0, 1.0, None), (0.5, None, 20.0)])
    assert (trace.name, trace.status) == ("trace", "ok")
    assert trace.read() == Reading(0.0, 1.0, None)
    assert not trace.exhausted
    assert trace.read() == Reading(0.5, None, 20.0)
    assert trace.exhausted
    assert trace.read() == Reading(0.5, None, 20.0)
    with pytest.raises(ValueError):
        TraceSource([])
