from __future__ import annotations

import itertools

import numpy as np
import pytest

from loadtest.arrivals import RateCurve, Segment, schedule


def test_each_segment_gets_exactly_its_expected_arrivals() -> None:
    curve = RateCurve.steps([1.0, 2.5, 4.0], step_s=10.0)
    arrivals = schedule(curve, seed=3)
    assert len(arrivals) == 75
    for segment, count in zip(curve.segments, curve.counts(), strict=True):
        inside = [a for a in arrivals if a.phase == segment.phase]
        assert len(inside) == count == round(segment.rps * segment.duration_s)
        assert all(segment.start_s <= a.offset_s < segment.end_s for a in inside)
    assert [a.index for a in arrivals] == list(range(75))
    assert all(x.offset_s <= y.offset_s for x, y in itertools.pairwise(arrivals))


def test_rounding_keeps_the_total_exact() -> None:
    curve = RateCurve([Segment(0, 1, 0.4, "a"), Segment(1, 2, 0.4, "b"), Segment(2, 3, 0.4, "c")])
    assert sum(curve.counts()) == round(curve.expected_count) == 1


def test_schedule_is_deterministic_per_seed() -> None:
    curve = RateCurve.constant(3.0, 20.0)
    assert schedule(curve, seed=1) == schedule(curve, seed=1)
    assert schedule(curve, seed=1) != schedule(curve, seed=2)


def test_poisson_gaps_look_exponential_and_low_burstiness_clumps() -> None:
    curve = RateCurve.constant(10.0, 1000.0)
    gaps = np.diff([a.offset_s for a in schedule(curve, seed=0)])
    assert gaps.mean() == pytest.approx(0.1, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1
    bursty = np.diff([a.offset_s for a in schedule(curve, seed=0, burstiness=0.25)])
    even = np.diff([a.offset_s for a in schedule(curve, seed=0, burstiness=4.0)])
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)  # gamma(k): CV 1/sqrt(k)
    assert even.std() / even.mean() == pytest.approx(0.5, rel=0.1)


def test_bad_curves_are_refused() -> None:
    with pytest.raises(ValueError):
        RateCurve([Segment(0, 1, 1, "a"), Segment(2, 3, 1, "b")])
    with pytest.raises(ValueError):
        schedule(RateCurve.constant(1, 1), burstiness=0)
