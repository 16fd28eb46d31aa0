"""The shape of a support day: how a day's requests spread over its 24 hours.

The default is a typical Vietnamese e-commerce support day (local time): a night trough
(02:00–05:00, ~1/8 of the busiest hour), a morning ramp, a lunch peak (11:00–13:00), an afternoon
plateau and the evening peak (20:00–22:00, the busiest hour: 21:00). Replace it with a CSV of
`hour,weight` rows (24 rows, hours 0–23, a header line is allowed); only the ratios matter.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

HOURS = 24
SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86_400.0

DEFAULT_HOURLY_WEIGHTS: tuple[float, ...] = (
    2.0, 1.2, 0.8, 0.7, 0.7, 0.9,  # 00–05: night trough
    1.6, 2.6, 3.6, 4.3, 4.8, 5.6,  # 06–11: morning ramp, lunch starts
    6.0, 5.2, 4.3, 4.1, 4.2, 4.5,  # 12–17: lunch peak, afternoon plateau
    4.9, 5.6, 6.4, 6.6, 5.2, 3.4,  # 18–23: evening peak
)  # fmt: skip


@dataclass(frozen=True)
class DailyProfile:
    """Relative request weights for the hours 0–23 of a day."""

    weights: tuple[float, ...] = DEFAULT_HOURLY_WEIGHTS
    source: str = "default (night trough, lunch and evening peaks)"

    def __post_init__(self) -> None:
        if len(self.weights) != HOURS:
            raise ValueError(f"a daily profile needs {HOURS} hourly weights, got {len(self.weights)}")
        if any(w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise ValueError("hourly weights must be >= 0 and not all 0")

    @classmethod
    def from_csv(cls, path: str | Path) -> DailyProfile:
        weights: dict[int, float] = {}
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.reader(handle):
                if not row or row[0].strip().startswith("#"):
                    continue
                try:
                    hour, weight = int(row[0]), float(row[1])
                except (ValueError, IndexError):
                    if weights:
                        raise ValueError(f"{path}: bad row {row!r} (want hour,weight)") from None
                    continue  # a header line
                if not 0 <= hour < HOURS or hour in weights:
                    raise ValueError(f"{path}: hour {hour} out of range or repeated")
                weights[hour] = weight
        if sorted(weights) != list(range(HOURS)):
            raise ValueError(f"{path}: need one row for each hour 0-23, got {sorted(weights)}")
        return cls(tuple(weights[h] for h in range(HOURS)), source=str(path))

    def shares(self) -> list[float]:
        """Fraction of the day's requests in each hour (sums to 1)."""
        total = sum(self.weights)
        return [w / total for w in self.weights]

    @property
    def peak_hour(self) -> int:
        return max(range(HOURS), key=lambda h: self.weights[h])

    @property
    def peak_factor(self) -> float:
        """Busiest hour's rate ÷ the day's mean rate."""
        return max(self.shares()) * HOURS

    def peak_rps(self, requests_per_day: float) -> float:
        """Arrival rate in the busiest hour of a real day with `requests_per_day`."""
        return requests_per_day * max(self.shares()) / SECONDS_PER_HOUR

    def requests_per_day_at_peak(self, peak_rps: float) -> float:
        """The daily volume whose busiest hour runs at `peak_rps`."""
        return peak_rps * SECONDS_PER_HOUR / max(self.shares())
