from __future__ import annotations

from loadtest.results import Sample
from loadtest.slo import Slo


def sample(i: int, ttft: float = 100.0, tpot: float | None = 20.0, ok: bool = True) -> Sample:
    return Sample(
        i,
        "p",
        i,
        i,
        i + 1,
        ok,
        ttft if ok else None,
        tpot if ok else None,
        1000.0,
        10,
        5,
        None if ok else "HTTP 503: busy",
    )


def test_slo_passes_and_fails_on_p95() -> None:
    samples = [sample(i) for i in range(100)]
    assert Slo().judge(samples, "all")["passed"]
    slow = samples[:94] + [sample(i, ttft=5000.0) for i in range(94, 100)]
    verdict = Slo().judge(slow, "all")
    assert not verdict["passed"] and verdict["reasons"][0].startswith("ttft_p95_ms")


def test_error_rate_and_empty_runs_fail() -> None:
    errors = [sample(i) for i in range(95)] + [sample(i, ok=False) for i in range(5)]
    assert not Slo(max_error_rate=0.01).judge(errors, "all")["passed"]
    assert Slo(max_error_rate=0.1).judge(errors, "all")["passed"]
    assert Slo().judge([], "peak hour")["reasons"] == ["no requests in peak hour"]


def test_unobservable_tpot_does_not_fail() -> None:
    assert Slo().judge([sample(i, tpot=None) for i in range(10)], "all")["passed"]
