"""GPU power limits: warnings instead of failed starts, and NVML's errors never escape.

No NVIDIA GPU here, so NVML itself is stood in for by `FakeNvml`, which has the few functions
`power_limits` calls and raises NVML's error shapes where told to. The real NVML is exercised by
`student gpu-check` on a GPU machine; what is tested here is what our code does with its errors.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.gateway.app import create_app
from server.runtime.settings import Settings
from server.telemetry.power_limits import NvmlPowerLimits, PowerLimitError, apply_power_limit
from server.telemetry.power_sources import NvmlSource, Reading, UnavailableSource


class FakeNvml:
    """Power-limit calls of pynvml on GPUs 0..n-1, each starting at 450 W (range 150-600 W)."""

    class NVMLError(Exception):
        pass

    class NVMLError_NoPermission(NVMLError):  # noqa: N801, N818  pynvml's own name, which our code looks up
        pass

    def __init__(self, gpus: int, fail_set_on: set[int] | None = None, fail_all_sets_after: int | None = None):
        self.limits_mw = [450_000] * gpus
        self.fail_set_on = fail_set_on or set()
        self.fail_all_sets_after = fail_all_sets_after
        self.sets = 0

    def nvmlDeviceGetPowerManagementLimit(self, handle: int) -> int:  # noqa: N802  pynvml's name
        return self.limits_mw[handle]

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: int) -> tuple[int, int]:  # noqa: N802  pynvml's name
        return 150_000, 600_000

    def nvmlDeviceSetPowerManagementLimit(self, handle: int, limit_mw: int) -> None:  # noqa: N802  pynvml's name
        self.sets += 1
        if handle in self.fail_set_on:
            raise self.NVMLError_NoPermission("Insufficient Permissions")
        if self.fail_all_sets_after is not None and self.sets > self.fail_all_sets_after:
            raise self.NVMLError("GPU is lost")
        self.limits_mw[handle] = limit_mw


class FakeNvmlSource:
    """A power source that reads (nothing) through `FakeNvml`, shaped like `NvmlSource`."""

    name = "nvml"
    status = "ok"
    reason = "stand-in NVML"

    def __init__(self, nvml: FakeNvml) -> None:
        self.nvml_module = nvml
        self.nvml_handles = tuple(range(len(nvml.limits_mw)))
        self.closed = False

    def read(self) -> Reading:
        return Reading(0.0, None, None)

    def power_limit_w(self) -> float:
        return sum(self.nvml_module.limits_mw) / 1000

    def close(self) -> None:
        self.closed = True


def test_no_limit_asked_means_nothing_to_restore() -> None:
    assert apply_power_limit(None, UnavailableSource("none here"))() is None


def test_a_limit_without_nvml_is_a_loud_warning_not_a_failed_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.telemetry.power_limits"):
        restore = apply_power_limit(300.0, UnavailableSource("no GPU on this box"))
    restore()
    assert "power limit 300 W not applied: it needs NVML (no GPU on this box)" in caplog.text


def test_an_unavailable_nvml_source_has_no_limits_to_set(caplog: pytest.LogCaptureFixture) -> None:
    source = NvmlSource()
    if source.status == "ok":
        pytest.skip("this machine has NVML: the refusal path is for machines without it")
    assert NvmlPowerLimits.for_source(source) is None
    with caplog.at_level(logging.WARNING, logger="server.telemetry.power_limits"):
        apply_power_limit(300.0, source)
    assert "power limit 300 W not applied: it needs NVML (NVML unavailable" in caplog.text
    assert source.power_limit_w() is None


def test_set_then_restore_puts_the_old_limits_back() -> None:
    nvml = FakeNvml(gpus=2)
    limits = NvmlPowerLimits(nvml, (0, 1))
    assert limits.set(300.0) == [450.0, 450.0]
    assert nvml.limits_mw == [300_000, 300_000]
    limits.restore([450.0, 450.0])
    assert nvml.limits_mw == [450_000, 450_000]


def test_a_limit_outside_the_range_changes_nothing() -> None:
    nvml = FakeNvml(gpus=1)
    with pytest.raises(PowerLimitError, match="700 W is outside this GPU's range 150–600 W"):
        NvmlPowerLimits(nvml, (0,)).set(700.0)
    assert nvml.limits_mw == [450_000] and nvml.sets == 0


def test_a_refused_second_gpu_undoes_the_first() -> None:
    nvml = FakeNvml(gpus=2, fail_set_on={1})
    with pytest.raises(PowerLimitError, match=r"cannot set the power limit: run as root$"):
        NvmlPowerLimits(nvml, (0, 1)).set(300.0)
    assert nvml.limits_mw == [450_000, 450_000]


def test_an_nvml_error_while_undoing_is_a_power_limit_error_not_an_nvml_error() -> None:
    """The undo of a half-applied limit used to call NVML outside any handler: its NVMLError
    escaped, and the gateway, which catches only PowerLimitError, failed to start."""
    nvml = FakeNvml(gpus=2, fail_set_on={1}, fail_all_sets_after=2)
    with pytest.raises(PowerLimitError, match="run as root; and GPU 0 left at the new limit \\(GPU is lost\\)"):
        NvmlPowerLimits(nvml, (0, 1)).set(300.0)


def test_a_failing_restore_is_a_warning_and_the_source_is_still_closed(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A raising restore used to skip `source.close()` (and escape the lifespan's shutdown)."""
    nvml = FakeNvml(gpus=1, fail_all_sets_after=1)  # the cap works, putting it back does not
    source = FakeNvmlSource(nvml)
    settings = Settings(
        upstream_urls=["http://127.0.0.1:9"], power_limit_w=300.0, ledger_path=tmp_path / "ledger.sqlite3"
    )
    with caplog.at_level(logging.INFO, logger="server.telemetry.power_limits"):
        with TestClient(create_app(settings, power_source=source)):  # runs the lifespan
            assert nvml.limits_mw == [300_000]
    assert "power limits not restored to [450.0] W: cannot set the power limit: GPU is lost" in caplog.text
    assert source.closed
