"""Percentiles of measured samples: one implementation for /stats, load tests, benchmarks and eval.

Linear interpolation between the two nearest ranks (numpy's default). Values that are None (a
request without a first token has no TTFT) are left out, and an empty sample gives None, so a
figure never stands for data that was not there.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

STATS_POINTS = (50, 95, 99)


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """The `q`-th percentile (0-100) of the known values; None when there are none."""
    known = [value for value in values if value is not None]
    return float(np.percentile(known, q)) if known else None


def percentiles(
    values: Iterable[float | None],
    points: Iterable[float] = STATS_POINTS,
    *,
    mean: bool = False,
    digits: int | None = None,
) -> dict[str, float | int | None]:
    """`{"count", ["mean",] "p50", ...}` of the known values, rounded to `digits` when given."""
    known = [value for value in values if value is not None]
    chosen = list(points)

    def shown(value: float) -> float:
        return round(value, digits) if digits is not None else value

    summary: dict[str, float | int | None] = {"count": len(known)}
    if mean:
        summary["mean"] = shown(float(np.mean(known))) if known else None
    figures = np.percentile(known, chosen).tolist() if known else [None] * len(chosen)
    for point, figure in zip(chosen, figures, strict=True):
        summary[f"p{point:g}"] = None if figure is None else shown(figure)
    return summary
