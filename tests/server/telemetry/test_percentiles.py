"""The one percentile implementation: numpy's linear interpolation, unknown values left out."""

from __future__ import annotations

import pytest

from server.telemetry.percentiles import percentile, percentiles


def test_linear_interpolation_and_unknown_values_left_out() -> None:
    values = [None, 10.0, 20.0, 30.0, 40.0, None]
    assert percentile(values, 50) == 25.0
    assert percentile(values, 95) == pytest.approx(38.5)
    assert percentiles(values) == {"count": 4, "p50": 25.0, "p95": pytest.approx(38.5), "p99": pytest.approx(39.7)}


def test_no_values_is_none_not_zero() -> None:
    assert percentile([None], 50) is None
    assert percentiles([], (50, 90), mean=True) == {"count": 0, "mean": None, "p50": None, "p90": None}


def test_mean_and_rounding_for_reports() -> None:
    assert percentiles([1.0, 2.0, 2.0], (50,), mean=True, digits=3) == {"count": 3, "mean": 1.667, "p50": 2.0}
