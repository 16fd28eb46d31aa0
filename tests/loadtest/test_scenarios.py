from __future__ import annotations

import copy
import math

import pytest

from loadtest.arrivals import RateCurve
from loadtest.profile import DailyProfile
from loadtest.scenarios import Burst, Capacity, Daily, Soak, judge_steps, project_day, queue_recovery, recovery_time
from loadtest.slo import Slo
from tests.loadtest.helpers import UNAVAILABLE_STATS, run_of

MEASURED_STATS = copy.deepcopy(UNAVAILABLE_STATS)
MEASURED_STATS["energy"] = {
    "status": "ok",
    "reason": None,
    "source": "nvml",
    "total_j": 13000.0,
    "active_j": 1100.0,
    "idle_j": 12000.0,
    "unattributed_j": 100.0,
    "idle_w": 200.0,
    "wall_power_factor": 1.0,
}


def test_daily_curve_follows_the_profile_and_plays_the_whole_day() -> None:
    daily = Daily(10_000, 1440.0, DailyProfile())
    curve = daily.curve()
    assert len(curve.segments) == 24 and curve.span_s == 1440.0
    assert sum(curve.counts()) == 10_000
    peak = curve.phase_of(f"h{DailyProfile().peak_hour:02d}")
    assert peak.rps == pytest.approx(curve.mean_rps * DailyProfile().peak_factor)


def test_day_projection_from_measured_energy() -> None:
    block = project_day(MEASURED_STATS, requests_per_day=10_000)
    energy, cost = block["energy"], block["cost"]
    assert energy["measured"]["energy_per_request_j"] == pytest.approx(10.0)  # (1100 - 100) J / 100 requests
    kwh = (200 * 86_400 + 10.0 * 10_000) / 3.6e6
    assert energy["projected_day"]["kwh"] == pytest.approx(kwh, rel=1e-3)
    assert cost["electricity_per_day"] == pytest.approx(kwh * 2998, rel=1e-3)
    assert cost["api_equivalent"]["gpt-4.1"]["per_day_usd"] == pytest.approx(0.4 / 100 * 10_000)


def test_unmeasured_energy_is_unavailable_never_zero() -> None:
    block = project_day(UNAVAILABLE_STATS, requests_per_day=10_000)
    assert block["energy"] == {"status": "unavailable", "reason": "no NVML, no RAPL", "source": None}
    assert block["cost"]["electricity_per_day"] is None
    assert block["cost"]["api_equivalent"]["deepseek-v3.2"]["per_month_usd"] == pytest.approx(0.021 / 100 * 10_000 * 30)
    assert project_day({"error": "refused"}, 10)["energy"]["status"] == "unavailable"


def test_daily_judges_the_peak_hour() -> None:
    profile = DailyProfile()
    daily = Daily(2000, 240.0, profile)
    curve = daily.curve()
    peak = f"h{profile.peak_hour:02d}"
    slow_peak = run_of(curve, ttft_ms=lambda a: 3000.0 if a.phase == peak else 50.0)
    block, verdict = daily.judge(slow_peak, curve, Slo())
    assert not verdict["passed"] and block["peak_hour"]["slo_passed"] is False
    slow_night = run_of(curve, ttft_ms=lambda a: 3000.0 if a.phase == "h03" else 50.0)
    assert daily.judge(slow_night, curve, Slo())[1]["passed"]


def test_a_lagging_generator_fails_the_run() -> None:
    soak = Soak(2.0, 60.0)
    curve = soak.curve()
    assert soak.judge(run_of(curve), curve, Slo())[1]["passed"]
    _, verdict = soak.judge(run_of(curve, late_s=0.5), curve, Slo())
    assert not verdict["passed"] and "lagged" in verdict["reasons"][-1]


def test_capacity_finds_the_last_step_before_the_slo_breaks() -> None:
    capacity = Capacity(1.0, 1.0, 10.0, 5.0, 5.0, DailyProfile(), 10_000)
    curve = capacity.curve()
    assert [s.rps for s in curve.segments] == [1.0, 2.0, 3.0, 4.0, 5.0]
    run = run_of(curve, ttft_ms=lambda a: 2000.0 if a.phase in ("step3", "step4") else 100.0)
    block, verdict = capacity.judge(run, curve, Slo())
    assert block["max_sustainable_rps"] == 3.0 and block["limit_found"]
    assert block["max_requests_per_day"] == math.floor(DailyProfile().requests_per_day_at_peak(3.0))
    assert verdict["passed"]  # 3 req/s at peak carries far more than 10,000 a day
    stop = capacity.stop_rule(curve, Slo())
    assert stop([s for s in run.samples if s.end < 35.0], 35.0) is None  # step3 still running
    assert "step3" in stop(run.samples, 100.0)


def test_capacity_fails_when_even_the_first_step_breaks() -> None:
    capacity = Capacity(1.0, 1.0, 10.0, 2.0, 5.0, DailyProfile(), 10_000)
    curve = capacity.curve()
    block, verdict = capacity.judge(run_of(curve, ttft_ms=lambda a: 5000.0), curve, Slo())
    assert block["max_sustainable_rps"] == 0.0 and block["max_requests_per_day"] == 0
    assert not verdict["passed"]


def test_unfinished_step_is_pending_then_failed() -> None:
    curve = RateCurve.steps([2.0], 10.0)
    run = run_of(curve)
    partial = run.samples[:10]
    scheduled = {"step0": 20}
    assert judge_steps(curve, scheduled, partial, Slo(), now=12.0, grace_s=5.0)[0]["passed"] is None
    late = judge_steps(curve, scheduled, partial, Slo(), now=16.0, grace_s=5.0)[0]
    assert late["passed"] is False and "10 request(s) unfinished" in late["reasons"]


def test_burst_recovery_time_and_queue() -> None:
    burst = Burst(2.0, 4.0, 10.0, 20.0, 60.0)
    curve = burst.curve()
    run = run_of(
        curve,
        ttft_ms=lambda a: 900.0 if 20.0 <= a.offset_s < 38.0 else 50.0,
        gateway_series=[{"t": 30.0, "waiting": 5}, {"t": 35.0, "waiting": 1}, {"t": 40.0, "waiting": 0}],
    )
    block, verdict = burst.judge(run, curve, Slo())
    first_good = min(s.sent for s in run.samples if s.sent >= 38.0)
    assert block["recovery_s"] == pytest.approx(first_good - 30.0, abs=1e-3)
    assert block["recovery_threshold_ms"] == pytest.approx(100.0)  # max(1.5 × 50, 50 + 50)
    assert block["queue_recovery_s"] == pytest.approx(10.0)
    assert verdict["passed"]


def test_burst_without_recovery_or_with_errors_fails() -> None:
    burst = Burst(2.0, 4.0, 10.0, 20.0, 60.0)
    curve = burst.curve()
    stuck = run_of(curve, ttft_ms=lambda a: 900.0 if a.offset_s >= 20.0 else 50.0)
    assert burst.judge(stuck, curve, Slo())[0]["recovery_s"] is None
    assert not burst.judge(stuck, curve, Slo())[1]["passed"]
    errors = run_of(curve, ok=lambda a: a.phase != "spike")
    block, verdict = burst.judge(errors, curve, Slo())
    assert block["errors"]["spike"] == block["errors"]["total"] > 0 and not verdict["passed"]
    assert recovery_time([], 10.0, None, None)["recovery_s"] is None
    assert queue_recovery([], 10.0)["queue_recovery_s"] is None


def test_soak_reports_latency_and_memory_drift() -> None:
    soak = Soak(2.0, 90.0)
    curve = soak.curve()
    memory = [{"t": t, "gateway": 100.0 + t / 10, "vllm": None} for t in range(0, 91, 10)]
    run = run_of(curve, ttft_ms=lambda a: 50.0 if a.offset_s < 30 else 100.0, memory=memory)
    block, _ = soak.judge(run, curve, Slo())
    assert block["latency_drift"]["first_to_last"]["ttft_p95_pct"] == pytest.approx(100.0)
    assert block["memory_drift"]["gateway"]["slope_mib_per_hour"] == pytest.approx(360.0)
    assert block["memory_drift"]["vllm"] == {"measured": False, "reason": "not measured (remote target)"}
