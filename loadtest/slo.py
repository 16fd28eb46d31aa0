"""The service-level objective a run is judged by, and the verdict on a set of requests."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from loadtest.results import Sample, latency_summary, request_counts

DEFAULT_TTFT_P95_MS = 1000.0
DEFAULT_TPOT_P95_MS = 100.0
DEFAULT_MAX_ERROR_RATE = 0.01


@dataclass(frozen=True)
class Slo:
    ttft_p95_ms: float = DEFAULT_TTFT_P95_MS
    tpot_p95_ms: float = DEFAULT_TPOT_P95_MS
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def judge(self, samples: list[Sample], scope: str) -> dict[str, Any]:
        """Checks of p95 TTFT, p95 TPOT and the error rate over `samples` (described by `scope`)."""
        latency = latency_summary(samples)
        counts = request_counts(samples)
        checks = [
            _check("ttft_p95_ms", latency["ttft"]["p95"], self.ttft_p95_ms),
            _check("tpot_p95_ms", latency["tpot"]["p95"], self.tpot_p95_ms, required=False),
            _check("error_rate", counts["error_rate"] if samples else None, self.max_error_rate),
        ]
        reasons = [c["reason"] for c in checks if not c["passed"]]
        if not samples:
            reasons = [f"no requests in {scope}"]
        return {
            "passed": not reasons,
            "scope": scope,
            "requests": len(samples),
            "objective": self.to_dict(),
            "checks": checks,
            "reasons": reasons,
        }


def _check(metric: str, observed: float | None, limit: float, required: bool = True) -> dict[str, Any]:
    """`required` False: a metric nobody could observe (TPOT of 1-token answers) does not fail."""
    passed = observed <= limit if observed is not None else not required
    if observed is None:
        reason = f"{metric}: not observed"
    else:
        reason = f"{metric} {observed:g} > {limit:g}" if not passed else ""
    return {"metric": metric, "observed": observed, "limit": limit, "passed": passed, "reason": reason}
