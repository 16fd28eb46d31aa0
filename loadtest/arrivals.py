"""Open-loop arrival schedules: when each request is due, whatever the server's response time.

A run's target rate is a `RateCurve`: consecutive segments of constant rate (one per compressed
hour for `daily`, one per step for `capacity`, before/spike/after for `burst`). `schedule()`
places arrivals in it:

- each segment gets exactly its expected number of arrivals (rate × length, rounded so that the
  whole curve's total is exact), so the achieved rate can be checked against the target;
- inside a segment the times are a Poisson process given that count (sorted uniform times), or,
  with `burstiness` ≠ 1, a gamma renewal process: gaps drawn from Gamma(shape=burstiness) and
  scaled to the segment, as vLLM's benchmark does (burstiness < 1 burstier, > 1 more even).

Deterministic for a given seed. No Locust here: the schedule is plain data that workers receive.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Segment:
    start_s: float
    end_s: float
    rps: float
    phase: str

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class Arrival:
    index: int
    offset_s: float  # from the run's start
    phase: str


class RateCurve:
    """Piecewise-constant target arrival rate over [0, span_s)."""

    def __init__(self, segments: list[Segment]):
        if not segments:
            raise ValueError("a rate curve needs at least one segment")
        for before, after in itertools.pairwise(segments):
            if not math.isclose(before.end_s, after.start_s, abs_tol=1e-9):
                raise ValueError("segments must be consecutive")
        if any(s.duration_s <= 0 or s.rps < 0 for s in segments):
            raise ValueError("segments need a positive length and a rate >= 0")
        self.segments = list(segments)

    @classmethod
    def constant(cls, rps: float, duration_s: float, phase: str = "steady") -> RateCurve:
        return cls([Segment(0.0, duration_s, rps, phase)])

    @classmethod
    def steps(cls, rates: list[float], step_s: float, label: str = "step") -> RateCurve:
        return cls([Segment(k * step_s, (k + 1) * step_s, r, f"{label}{k}") for k, r in enumerate(rates)])

    @property
    def span_s(self) -> float:
        return self.segments[-1].end_s

    @property
    def expected_count(self) -> float:
        return sum(s.rps * s.duration_s for s in self.segments)

    @property
    def mean_rps(self) -> float:
        return self.expected_count / self.span_s

    @property
    def peak_rps(self) -> float:
        return max(s.rps for s in self.segments)

    def rate_at(self, t_s: float) -> float:
        for segment in self.segments:
            if segment.start_s <= t_s < segment.end_s:
                return segment.rps
        return 0.0

    def phase_of(self, name: str) -> Segment:
        return next(s for s in self.segments if s.phase == name)

    def counts(self) -> list[int]:
        """Arrivals per segment: rounded so that the total is round(expected_count) exactly."""
        expected = [s.rps * s.duration_s for s in self.segments]
        counts = [math.floor(e) for e in expected]
        short = round(sum(expected)) - sum(counts)
        by_remainder = sorted(range(len(expected)), key=lambda k: expected[k] - counts[k], reverse=True)
        for k in by_remainder[: max(short, 0)]:
            counts[k] += 1
        return counts


def schedule(curve: RateCurve, *, seed: int = 0, burstiness: float = 1.0) -> list[Arrival]:
    """All arrivals of `curve`, in time order, indexed from 0."""
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0 (1 = Poisson)")
    rng = np.random.default_rng(seed)
    arrivals: list[Arrival] = []
    for segment, count in zip(curve.segments, curve.counts(), strict=True):
        if count == 0:
            continue
        if burstiness == 1.0:
            fractions = np.sort(rng.uniform(0.0, 1.0, count))
        else:
            gaps = rng.gamma(shape=burstiness, scale=1.0, size=count + 1)
            fractions = np.cumsum(gaps)[:-1] / gaps.sum()
        for fraction in fractions:
            offset = segment.start_s + float(fraction) * segment.duration_s
            arrivals.append(Arrival(len(arrivals), offset, segment.phase))
    return arrivals
