"""The app's lifespan helpers that need no stack: the GPU power limit when there is no NVML."""

from __future__ import annotations

import logging

import pytest

from server.gateway.app import _apply_power_limit
from server.telemetry.power_sources import NvmlSource, PowerLimitError, UnavailableSource


def test_no_limit_asked_means_nothing_to_restore() -> None:
    assert _apply_power_limit(None, UnavailableSource("none here"))() is None


def test_a_limit_without_nvml_is_a_loud_warning_not_a_failed_start(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="server.gateway.app"):
        restore = _apply_power_limit(300.0, UnavailableSource("no GPU on this box"))
    restore()
    assert "power limit 300 W not applied: it needs NVML (no GPU on this box)" in caplog.text


def test_nvml_source_refuses_a_limit_when_nvml_is_unavailable() -> None:
    source = NvmlSource()
    if source.status == "ok":
        pytest.skip("this machine has NVML: the refusal path is for machines without it")
    with pytest.raises(PowerLimitError, match="a power limit needs NVML: NVML unavailable"):
        source.set_power_limit(300.0)
    assert source.power_limit_w() is None
