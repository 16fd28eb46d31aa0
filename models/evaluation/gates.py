"""Pass/fail thresholds on the first target (the candidate), so an eval can gate a deploy.

Exit status as `student load`: 0 when every gate holds, 1 when one fails, 2 when the eval could
not run at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

EXIT_PASSED, EXIT_GATE_FAILED, EXIT_CANNOT_RUN = 0, 1, 2


@dataclass(frozen=True)
class GateSpec:
    """A threshold flag: which summary figure it reads and in which direction it must hold."""

    flag: str
    figure: str  # a key of the target's summary, or "judge.win_rate"
    name: str
    at_least: bool


GATES = (
    GateSpec("--min-fact-recall", "fact_recall", "fact recall", at_least=True),
    GateSpec("--min-vietnamese", "vietnamese_share", "Vietnamese share", at_least=True),
    GateSpec("--max-empty", "empty_share", "empty share", at_least=False),
    GateSpec("--min-win-rate", "judge.win_rate", "judge win rate", at_least=True),
)


@dataclass(frozen=True)
class Gate:
    spec: GateSpec
    threshold: float
    value: float | None  # None: the figure could not be computed (the gate fails)

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.threshold if self.spec.at_least else self.value <= self.threshold

    def describe(self) -> str:
        """E.g. "--min-fact-recall: fact recall 0.125 < 0.99 FAILED"."""
        if self.value is None:
            needs = ">=" if self.spec.at_least else "<="
            unknown = f"{self.spec.name} unknown (nothing to compute it from)"
            return f"{self.spec.flag}: {unknown}, needs {needs} {self.threshold:g}: FAILED"
        holds = (">=" if self.passed else "<") if self.spec.at_least else ("<=" if self.passed else ">")
        state = "passed" if self.passed else "FAILED"
        return f"{self.spec.flag}: {self.spec.name} {self.value:.4g} {holds} {self.threshold:g}: {state}"

    def as_json(self) -> dict[str, Any]:
        return {
            "flag": self.spec.flag,
            "figure": self.spec.name,
            "threshold": self.threshold,
            "at_least": self.spec.at_least,
            "value": self.value,
            "passed": self.passed,
        }


def check_gates(thresholds: Mapping[str, float | None], summary: Mapping[str, Any]) -> list[Gate]:
    """The gates whose flag was given (`thresholds`: flag -> value or None), on one target's summary."""
    gates = []
    for spec in GATES:
        threshold = thresholds.get(spec.flag)
        if threshold is not None:
            gates.append(Gate(spec, threshold, _figure(summary, spec.figure)))
    return gates


def _figure(summary: Mapping[str, Any], path: str) -> float | None:
    value: Any = summary
    for key in path.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value if isinstance(value, (int, float)) else None
