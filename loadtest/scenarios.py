"""The four scenarios: each gives a target rate curve, an optional early-stop rule, and its verdict.

- `Daily`: a day's requests over a 24-hour profile, time-compressed; SLO judged in the peak
  hour; the day's energy and electricity projected back to real time next to the API cost.
- `Capacity`: rising steps of arrival rate until a step breaks the SLO; the highest sustainable
  rate, and the largest daily volume whose peak hour still meets the SLO.
- `Soak`: a steady rate; drift of latency and of the gateway's and vLLM's memory.
- `Burst`: a spike (×factor for some seconds) over a base rate; recovery time and errors.

Pure: they read samples and the gateway's `/stats`, never Locust.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.arrivals import RateCurve, Segment
from loadtest.profile import HOURS, SECONDS_PER_DAY, DailyProfile
from loadtest.results import (
    LATE_THRESHOLD_S,
    RunResult,
    Sample,
    latency_summary,
    lateness,
    percentiles,
    request_counts,
)
from loadtest.slo import Slo
from server.accounting.energy_units import kwh
from server.accounting.tariff import Tariff

DAYS_PER_MONTH = 30
STEP_MIN_SENT_SHARE = 0.95  # a capacity step whose generator sent less than this on time does not count


@dataclass
class Daily:
    requests_per_day: int
    day_seconds: float
    profile: DailyProfile
    name: str = "daily"

    def curve(self) -> RateCurve:
        hour_s = self.day_seconds / HOURS
        return RateCurve(
            [
                Segment(h * hour_s, (h + 1) * hour_s, self.requests_per_day * share / hour_s, f"h{h:02d}")
                for h, share in enumerate(self.profile.shares())
            ]
        )

    def stop_rule(self, curve: RateCurve, slo: Slo):
        return None

    def judge(self, run: RunResult, curve: RateCurve, slo: Slo) -> tuple[dict[str, Any], dict[str, Any]]:
        peak = self.profile.peak_hour
        peak_samples = [s for s in run.samples if s.phase == f"h{peak:02d}"]
        verdict = slo.judge(peak_samples, f"peak hour {peak:02d}:00-{peak + 1:02d}:00; errors over the day")
        day = request_counts(run.samples)
        if day["error_rate"] > slo.max_error_rate:
            verdict["reasons"].append(f"error rate over the day {day['error_rate']:g} > {slo.max_error_rate:g}")
        _require_punctual_generator(verdict, run.samples)
        block = {
            "requests_per_day": self.requests_per_day,
            "day_seconds": self.day_seconds,
            "time_compression": round(SECONDS_PER_DAY / self.day_seconds, 3),
            "profile": {
                "source": self.profile.source,
                "weights": list(self.profile.weights),
                "peak_hour": peak,
                "peak_factor": round(self.profile.peak_factor, 4),
            },
            "peak_hour": {
                "hour": peak,
                "target_rps": round(curve.phase_of(f"h{peak:02d}").rps, 4),
                "real_day_rps": round(self.profile.peak_rps(self.requests_per_day), 4),
                "requests": len(peak_samples),
                "latency_ms": latency_summary(peak_samples),
                "slo_passed": verdict["passed"],
            },
            **project_day(run.gateway_window, self.requests_per_day),
        }
        return block, verdict


def project_day(gateway: dict[str, Any], requests_per_day: int) -> dict[str, Any]:
    """Energy and electricity of a real day (idle W × 24 h + energy per request × N) and the API cost.

    From the gateway's `/stats?window=<run>`; energy it could not measure stays unavailable, never 0.
    """
    if "error" in gateway:
        reason = f"gateway /stats unreadable: {gateway['error']}"
        return {
            "energy": {"status": "unavailable", "reason": reason},
            "cost": {"status": "unavailable", "reason": reason},
        }
    energy, cost = gateway.get("energy") or {}, gateway.get("cost") or {}
    served = (gateway.get("requests") or {}).get("total") or 0
    api = {}
    for name, figures in (cost.get("api_equivalent") or {}).items():
        per_request = figures.get("cost_usd", 0.0) / served if served else None
        api[name] = {
            "per_request_usd": _round(per_request, 8),
            "per_day_usd": _round(per_request * requests_per_day if per_request is not None else None, 4),
            "per_month_usd": _round(
                per_request * requests_per_day * DAYS_PER_MONTH if per_request is not None else None, 2
            ),
        }
    cost_block: dict[str, Any] = {
        "currency": cost.get("currency"),
        "price_per_kwh": cost.get("price_per_kwh"),
        "usd_rate": cost.get("usd_rate"),
        "api_equivalent": api,
    }
    if energy.get("status") != "ok":
        why = energy.get("reason") or "the gateway reports no energy"
        energy_block = {"status": "unavailable", "reason": why, "source": energy.get("source")}
        cost_block.update({"electricity_per_day": None, "electricity_per_month": None, "electricity_reason": why})
        return {"energy": energy_block, "cost": cost_block}
    if not served or energy.get("idle_w") is None:
        why = "no requests measured in the window" if not served else "idle power not known yet"
        return {"energy": {"status": "unavailable", "reason": why, "source": energy.get("source")}, "cost": cost_block}
    factor = energy.get("wall_power_factor") or 1.0
    per_request_j = max((energy.get("active_j") or 0.0) - (energy.get("unattributed_j") or 0.0), 0.0) / served
    idle_day_j = energy["idle_w"] * SECONDS_PER_DAY
    active_day_j = per_request_j * requests_per_day
    tariff = Tariff(
        price_per_kwh=cost.get("price_per_kwh") or 0.0,
        currency=cost.get("currency") or "VND",
        usd_rate=cost.get("usd_rate") or 1.0,
        wall_power_factor=factor,
    )
    day_cost = tariff.energy_cost(idle_day_j + active_day_j) or 0.0
    energy_block = {
        "status": "ok",
        "source": energy.get("source"),
        "measured": {
            "window_s": gateway.get("window_s"),
            "requests": served,
            "total_j": energy.get("total_j"),
            "active_j": energy.get("active_j"),
            "idle_j": energy.get("idle_j"),
            "unattributed_j": energy.get("unattributed_j"),
            "idle_w": energy["idle_w"],
            "energy_per_request_j": round(per_request_j, 3),
        },
        "wall_power_factor": factor,
        "projected_day": {
            "idle_kwh": round(kwh(idle_day_j * factor), 4),
            "active_kwh": round(kwh(active_day_j * factor), 4),
            "kwh": round(kwh((idle_day_j + active_day_j) * factor), 4),
        },
        "note": "per-request energy measured in the compressed run "
        "(busier than a real day, so batching may make it lower)",
    }
    cost_block.update(
        {
            "electricity_per_day": round(day_cost, 2),
            "electricity_per_day_usd": round(tariff.to_usd(day_cost) or 0.0, 4),
            "electricity_per_month": round(day_cost * DAYS_PER_MONTH, 2),
            "electricity_per_month_usd": round(tariff.to_usd(day_cost * DAYS_PER_MONTH) or 0.0, 2),
        }
    )
    return {"energy": energy_block, "cost": cost_block}


@dataclass
class Capacity:
    start_rps: float
    step_rps: float
    step_seconds: float
    max_rps: float
    step_grace_s: float
    profile: DailyProfile
    requests_per_day: int
    name: str = "capacity"

    def rates(self) -> list[float]:
        count = math.floor((self.max_rps - self.start_rps) / self.step_rps + 1e-9) + 1
        return [round(self.start_rps + k * self.step_rps, 6) for k in range(max(count, 1))]

    def curve(self) -> RateCurve:
        return RateCurve.steps(self.rates(), self.step_seconds)

    def stop_rule(self, curve: RateCurve, slo: Slo):
        scheduled = dict(zip((s.phase for s in curve.segments), curve.counts(), strict=True))

        def first_broken_step(samples: list[Sample], now: float) -> str | None:
            for step in judge_steps(curve, scheduled, samples, slo, now, self.step_grace_s):
                if step["passed"] is False:
                    return f"{step['phase']} at {step['target_rps']:g} req/s broke the SLO"
            return None

        return first_broken_step

    def judge(self, run: RunResult, curve: RateCurve, slo: Slo) -> tuple[dict[str, Any], dict[str, Any]]:
        scheduled = dict(zip((s.phase for s in curve.segments), curve.counts(), strict=True))
        steps = judge_steps(curve, scheduled, run.samples, slo, math.inf, self.step_grace_s)
        sustainable = 0.0
        for step in steps:
            if not step["passed"]:
                break
            sustainable = step["target_rps"]
        per_day = math.floor(self.profile.requests_per_day_at_peak(sustainable))
        broke = next((s for s in steps if s["passed"] is False), None)
        block = {
            "max_sustainable_rps": sustainable,
            "max_requests_per_day": per_day,
            "limit_found": broke is not None,
            "limit_note": (
                f"the SLO broke at {broke['target_rps']:g} req/s"
                if broke
                else f"the SLO held up to the highest rate tried ({steps[-1]['target_rps']:g} req/s): "
                "capacity is at least this"
            ),
            "peak_factor": round(self.profile.peak_factor, 4),
            "required_requests_per_day": self.requests_per_day,
            "required_peak_rps": round(self.profile.peak_rps(self.requests_per_day), 4),
            "steps": steps,
        }
        verdict = {
            "passed": per_day >= self.requests_per_day,
            "scope": f"capacity for {self.requests_per_day} requests/day (peak {block['required_peak_rps']:g} req/s)",
            "objective": slo.to_dict(),
            "checks": [
                {
                    "metric": "max_requests_per_day",
                    "observed": per_day,
                    "limit": self.requests_per_day,
                    "passed": per_day >= self.requests_per_day,
                }
            ],
            "reasons": []
            if per_day >= self.requests_per_day
            else [f"the SLO holds up to {per_day} requests/day, fewer than the {self.requests_per_day} required"],
        }
        return block, verdict


def judge_steps(
    curve: RateCurve, scheduled: dict[str, int], samples: list[Sample], slo: Slo, now: float, grace_s: float
) -> list[dict[str, Any]]:
    """Each capacity step: its SLO check once all its requests are done (or `grace_s` after it ended).

    `passed` is None while a step is still running, False when its SLO broke, its generator could
    not send its arrivals on time, or its requests did not finish within the grace time.
    """
    steps = []
    for segment in curve.segments:
        members = [s for s in samples if s.phase == segment.phase]
        expected = scheduled[segment.phase]
        finished = len(members) >= expected or now > segment.end_s + grace_s
        step: dict[str, Any] = {
            "phase": segment.phase,
            "target_rps": segment.rps,
            "scheduled": expected,
            "done": len(members),
            "passed": None,
        }
        if members:
            on_time = sum(1 for s in members if s.sent <= segment.end_s + LATE_THRESHOLD_S)
            step["achieved_rps"] = round(on_time / segment.duration_s, 4)
            step["latency_ms"] = latency_summary(members)
        if finished and (members or expected == 0):
            verdict = slo.judge(members, segment.phase)
            reasons = list(verdict["reasons"])
            if len(members) < expected:
                reasons.append(f"{expected - len(members)} request(s) unfinished")
            if expected and step.get("achieved_rps", 0) * segment.duration_s < STEP_MIN_SENT_SHARE * expected:
                reasons.append("the generator could not send this step's arrivals on time")
            step.update(passed=not reasons, reasons=reasons)
        elif finished:
            step.update(passed=False, reasons=["no request finished"])
        steps.append(step)
        if step["passed"] is not True:
            break  # later steps are judged only once this one passed
    return steps


@dataclass
class Soak:
    rps: float
    duration_s: float
    drift_windows: int = 3
    name: str = "soak"

    def curve(self) -> RateCurve:
        return RateCurve.constant(self.rps, self.duration_s)

    def stop_rule(self, curve: RateCurve, slo: Slo):
        return None

    def judge(self, run: RunResult, curve: RateCurve, slo: Slo) -> tuple[dict[str, Any], dict[str, Any]]:
        verdict = slo.judge(run.samples, "whole run")
        _require_punctual_generator(verdict, run.samples)
        return {
            "rps": self.rps,
            "duration_s": self.duration_s,
            "latency_drift": latency_drift(run.samples, self.duration_s, self.drift_windows),
            "memory_drift": memory_drift(run.memory_series, run.processes),
        }, verdict


def latency_drift(samples: list[Sample], span_s: float, windows: int) -> dict[str, Any]:
    """p50/p95 of TTFT, TPOT and e2e in equal windows of the run, and the first→last change."""
    width = span_s / windows
    rows = []
    for k in range(windows):
        members = [s for s in samples if s.ok and k * width <= s.sched < (k + 1) * width]
        rows.append(
            {
                "from_s": round(k * width, 3),
                "to_s": round((k + 1) * width, 3),
                "requests": len(members),
                **{
                    f"{m}_p{p}": percentiles(getattr(s, f"{m}_ms") for s in members)[f"p{p}"]
                    for m in ("ttft", "tpot", "e2e")
                    for p in (50, 95)
                },
            }
        )
    change = {}
    for key in ("ttft_p95", "tpot_p95", "e2e_p95"):
        first, last = rows[0][key], rows[-1][key]
        change[f"{key}_pct"] = round((last - first) / first * 100, 1) if first and last is not None else None
    return {"windows": rows, "first_to_last": change}


def memory_drift(series: list[dict[str, Any]], processes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per served process: RSS at start and end, maximum, and the least-squares slope (MiB/hour)."""
    drift = {}
    for name, found in processes.items():
        points = [(row["t"], row[name]) for row in series if row.get(name) is not None]
        if len(points) < 2:
            drift[name] = {"measured": False, "reason": found.get("reason") or "fewer than two memory samples"}
            continue
        t, rss = np.array(points).T
        slope_per_s = float(np.polyfit(t, rss, 1)[0]) if np.ptp(t) > 0 else 0.0
        drift[name] = {
            "measured": True,
            "pid": found.get("pid"),
            "includes_children": found.get("includes_children"),
            "start_mib": round(float(rss[0]), 1),
            "end_mib": round(float(rss[-1]), 1),
            "max_mib": round(float(rss.max()), 1),
            "change_mib": round(float(rss[-1] - rss[0]), 1),
            "slope_mib_per_hour": round(slope_per_s * 3600, 1),
            "samples": len(points),
        }
    return drift


@dataclass
class Burst:
    rps: float
    factor: float
    burst_seconds: float
    at_s: float
    duration_s: float
    recovery_threshold_ms: float | None = None
    name: str = "burst"
    phases: tuple[str, ...] = field(default=("before", "spike", "after"), init=False)

    def __post_init__(self) -> None:
        if not (0 < self.at_s and self.at_s + self.burst_seconds < self.duration_s):
            raise ValueError("the spike must start after 0 and end before the run does (check --burst-at-s)")

    def curve(self) -> RateCurve:
        end = self.at_s + self.burst_seconds
        return RateCurve(
            [
                Segment(0.0, self.at_s, self.rps, "before"),
                Segment(self.at_s, end, self.rps * self.factor, "spike"),
                Segment(end, self.duration_s, self.rps, "after"),
            ]
        )

    def stop_rule(self, curve: RateCurve, slo: Slo):
        return None

    def judge(self, run: RunResult, curve: RateCurve, slo: Slo) -> tuple[dict[str, Any], dict[str, Any]]:
        before = [s for s in run.samples if s.phase == "before"]
        baseline_verdict = slo.judge(before, "before the spike")
        spike_end = self.at_s + self.burst_seconds
        recovery = recovery_time(run.samples, spike_end, baseline_ttft_p95(before), self.recovery_threshold_ms)
        queue = queue_recovery(run.gateway_series, spike_end)
        errors = {phase: request_counts([s for s in run.samples if s.phase == phase]) for phase in self.phases}
        total_errors = sum(e["error"] for e in errors.values())
        reasons = [f"before the spike: {r}" for r in baseline_verdict["reasons"]]
        if total_errors > slo.max_error_rate * len(run.samples):
            reasons.append(f"{total_errors} error(s) of {len(run.samples)} requests")
        if recovery["recovery_s"] is None:
            reasons.append("latency did not recover before the run ended")
        block = {
            "base_rps": self.rps,
            "factor": self.factor,
            "burst_seconds": self.burst_seconds,
            "spike_from_s": self.at_s,
            "spike_to_s": spike_end,
            **recovery,
            **queue,
            "errors": {
                "total": total_errors,
                **{p: e["error"] for p, e in errors.items()},
                "messages": {k: v for e in errors.values() for k, v in e["errors"].items()},
            },
            "latency_ms": {p: latency_summary([s for s in run.samples if s.phase == p]) for p in self.phases},
        }
        verdict = {**baseline_verdict, "scope": "baseline SLO, errors and recovery", "reasons": reasons}
        _require_punctual_generator(verdict, run.samples)
        return block, verdict


def baseline_ttft_p95(samples: list[Sample]) -> float | None:
    return percentiles(s.ttft_ms for s in samples if s.ok)["p95"]


def recovery_time(
    samples: list[Sample], spike_end_s: float, baseline_ms: float | None, threshold_ms: float | None
) -> dict[str, Any]:
    """Seconds from the spike's end until every later request succeeds with TTFT ≤ threshold.

    Threshold: given, else max(1.5 × the baseline p95 TTFT, baseline + 50 ms). 0 when no request
    after the spike exceeded it; None when the last request still did.
    """
    if threshold_ms is None:
        if baseline_ms is None:
            return {
                "recovery_s": None,
                "recovery_threshold_ms": None,
                "baseline_ttft_p95_ms": None,
                "recovery_note": "no baseline: no successful request before the spike",
            }
        threshold_ms = max(1.5 * baseline_ms, baseline_ms + 50.0)
    after = sorted((s for s in samples if s.sent >= spike_end_s), key=lambda s: s.sent)
    bad = [k for k, s in enumerate(after) if not s.ok or s.ttft_ms is None or s.ttft_ms > threshold_ms]
    if not bad:
        recovered = 0.0
    elif bad[-1] + 1 < len(after):
        recovered = round(after[bad[-1] + 1].sent - spike_end_s, 3)
    else:
        recovered = None
    return {
        "recovery_s": recovered,
        "recovery_threshold_ms": round(threshold_ms, 3),
        "baseline_ttft_p95_ms": baseline_ms,
        "degraded_after_spike": len(bad),
    }


def queue_recovery(series: list[dict[str, Any]], spike_end_s: float) -> dict[str, Any]:
    """Seconds from the spike's end until vLLM's waiting queue is empty for good (from /stats)."""
    points = [
        (row["t"], row["waiting"]) for row in series if row.get("waiting") is not None and row["t"] >= spike_end_s
    ]
    if not points:
        return {"queue_recovery_s": None, "queue_note": "vLLM's queue not reported by /stats"}
    busy = [t for t, waiting in points if waiting > 0]
    if not busy:
        return {"queue_recovery_s": 0.0, "max_waiting": max(w for _, w in points)}
    later = [t for t, _ in points if t > busy[-1]]
    return {
        "queue_recovery_s": round(later[0] - spike_end_s, 3) if later else None,
        "max_waiting": max(w for _, w in points),
    }


def _require_punctual_generator(verdict: dict[str, Any], samples: list[Sample]) -> None:
    """A run whose generator sent its arrivals late did not apply the scheduled load: it cannot pass."""
    late = lateness(samples)
    if late["lagging"]:
        verdict["reasons"].append(
            f"the load generator lagged ({100 * late['late_fraction']:.0f}% of requests sent more than "
            f"{late['late_threshold_ms']:.0f} ms late): the scheduled load was not applied"
        )
    verdict["passed"] = not verdict["reasons"]


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
