"""One request as the virtual customer saw it, and the arithmetic on many of them.

Times are seconds from the run's start (`sched`: when the arrival was due, `sent`: when it went
out, `end`: when the last byte came); latencies in ms, as vLLM's benchmark defines them:
TTFT = first content − sent, TPOT = (end − first token) / (completion tokens − 1),
e2e = end − sent. Tokens are the server's `usage`. Pure functions, no Locust.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from server.telemetry.percentiles import percentile
from server.telemetry.percentiles import percentiles as shared_percentiles

PERCENTILES = (50, 90, 95, 99)
LATE_THRESHOLD_S = 0.1  # an arrival sent later than this behind schedule is "late"
LATE_FRACTION_LIMIT = 0.05  # more late arrivals than this: the generator is lagging


@dataclass(slots=True)
class Sample:
    index: int
    phase: str
    sched: float
    sent: float
    end: float
    ok: bool
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def late_s(self) -> float:
        return self.sent - self.sched

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Sample:
        return cls(**data)


@dataclass
class RunResult:
    """What one run produced: the samples plus the serving side's view over the same span."""

    samples: list[Sample]
    started_at: str
    t0_epoch: float
    elapsed_s: float
    stopped_early: str | None
    users_initial: int
    users_max: int
    worker_count: int
    cpu_warning: bool
    gateway_series: list[dict[str, Any]]  # /stats?window= polled during the run
    memory_series: list[dict[str, Any]]  # {"t", "gateway": MiB | None, "vllm": MiB | None}
    processes: dict[str, dict[str, Any]]  # how each served process was found, or why not
    gateway_window: dict[str, Any]  # /stats?window=<the run> at the end
    vllm_url: str | None
    locust_files: list[str] = field(default_factory=list)


def percentiles(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """count, mean and p50/p90/p95/p99 of the known values, in ms to 3 decimals (None when none)."""
    return shared_percentiles(values, PERCENTILES, mean=True, digits=3)


def latency_summary(samples: list[Sample]) -> dict[str, dict[str, float | int | None]]:
    """Percentiles of TTFT, TPOT and end-to-end latency over the successful requests."""
    ok = [s for s in samples if s.ok]
    return {
        "ttft": percentiles(s.ttft_ms for s in ok),
        "tpot": percentiles(s.tpot_ms for s in ok),
        "e2e": percentiles(s.e2e_ms for s in ok),
    }


def request_counts(samples: list[Sample]) -> dict[str, Any]:
    errors = Counter(s.error or "unknown error" for s in samples if not s.ok)
    return {
        "total": len(samples),
        "ok": sum(1 for s in samples if s.ok),
        "error": sum(errors.values()),
        "error_rate": round(sum(errors.values()) / len(samples), 4) if samples else 0.0,
        "errors": dict(errors.most_common(10)),
    }


def token_summary(samples: list[Sample], span_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok and s.completion_tokens is not None]
    prompt = [s.prompt_tokens or 0 for s in ok]
    completion = [s.completion_tokens or 0 for s in ok]
    return {
        "prompt_total": sum(prompt),
        "completion_total": sum(completion),
        "prompt_mean": round(sum(prompt) / len(ok), 1) if ok else None,
        "completion_mean": round(sum(completion) / len(ok), 1) if ok else None,
        "per_request_mean": round((sum(prompt) + sum(completion)) / len(ok), 1) if ok else None,
        "completion_tokens_per_s": round(sum(completion) / span_s, 2) if span_s > 0 else None,
    }


def arrival_accuracy(
    scheduled: int, samples: list[Sample], span_s: float, grace_s: float = LATE_THRESHOLD_S
) -> dict[str, Any]:
    """Target vs achieved arrival rate: requests sent within the scheduled span (plus grace) ÷ span."""
    sent_in_span = sum(1 for s in samples if s.sent <= span_s + grace_s)
    target = scheduled / span_s if span_s > 0 else 0.0
    achieved = sent_in_span / span_s if span_s > 0 else 0.0
    return {
        "span_s": round(span_s, 3),
        "scheduled": scheduled,
        "sent": len(samples),
        "sent_in_span": sent_in_span,
        "target_rps": round(target, 4),
        "achieved_rps": round(achieved, 4),
        "achieved_ratio": round(achieved / target, 4) if target else None,
    }


def lateness(
    samples: list[Sample], threshold_s: float = LATE_THRESHOLD_S, limit: float = LATE_FRACTION_LIMIT
) -> dict[str, Any]:
    """How far behind schedule requests went out; `lagging` when too many were late."""
    late = np.array([max(s.late_s, 0.0) for s in samples], dtype=float)
    late_fraction = float((late > threshold_s).mean()) if late.size else 0.0
    return {
        "late_threshold_ms": threshold_s * 1000,
        "late_fraction": round(late_fraction, 4),
        "late_p95_ms": None if not late.size else round(float(percentile(late.tolist(), 95) or 0.0) * 1000, 1),
        "late_max_ms": round(float(late.max()) * 1000, 1) if late.size else None,
        "lagging": late_fraction > limit,
    }


def time_buckets(samples: list[Sample], span_s: float, bucket_s: float) -> list[dict[str, Any]]:
    """Per time bucket (by send time): arrivals sent, TTFT/TPOT/e2e p50/p95, completion tokens/s."""
    count = max(1, math.ceil(span_s / bucket_s))
    buckets: list[list[Sample]] = [[] for _ in range(count)]
    ends: list[int] = [0] * count
    for s in samples:
        k = min(max(int(s.sent // bucket_s), 0), count - 1)
        buckets[k].append(s)
        if s.ok and s.completion_tokens:
            ends[min(max(int(s.end // bucket_s), 0), count - 1)] += s.completion_tokens
    rows = []
    for k, members in enumerate(buckets):
        ok = [s for s in members if s.ok]
        row: dict[str, Any] = {
            "t": round((k + 0.5) * bucket_s, 3),
            "sent_rps": len(members) / bucket_s,
            "errors": len(members) - len(ok),
            "completion_tokens_per_s": ends[k] / bucket_s,
        }
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            values = [getattr(s, name) for s in ok]
            row[f"{name}_p50"] = percentile(values, 50)
            row[f"{name}_p95"] = percentile(values, 95)
        rows.append(row)
    return rows
