"""What a check returns and how one runs: `Skip`, `Outcome`, `CheckResult`, `run_check`, `skipped`.

Also the run's progress lines (`say`, stamped with `elapsed_s()`) and `cuda_device()`, where a
check learns that CUDA cannot be used and why. The check modules and the runner import this;
it imports neither.
"""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_STARTED = time.monotonic()


def elapsed_s() -> float:
    """Seconds since the run's clock started (when this module was first imported)."""
    return time.monotonic() - _STARTED


def say(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since start."""
    print(f"[gpu-check {elapsed_s():6.1f}s] {message}", file=sys.stderr, flush=True)


class Skip(Exception):  # noqa: N818  a signal to skip a check, as pytest.skip, not an error
    """This check cannot run on this machine; the message says why."""


@dataclass
class Outcome:
    """What a check found: a one-line summary, its numbers, and why it failed (empty: passed)."""

    summary: str
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def require(self, condition: bool, failure: str) -> None:
        if not condition:
            self.failures.append(failure)


@dataclass
class CheckResult:
    name: str
    part: str  # "cpu" or "gpu"
    title: str
    status: str  # passed | failed | skipped | error
    summary: str
    reason: str | None
    elapsed_s: float
    metrics: dict[str, Any]


def run_check(name: str, part: str, title: str, body: Callable[[], Outcome]) -> CheckResult:
    """Run one check, timing it; a Skip or an exception becomes its status, never a crash."""
    say(f"{name}: {title}")
    started_s = time.monotonic()
    try:
        outcome = body()
    except Skip as skip:
        result = CheckResult(name, part, title, "skipped", "–", str(skip), time.monotonic() - started_s, {})
    except Exception as error:  # a broken check must not hide the others
        detail = traceback.format_exc(limit=-3)
        result = CheckResult(
            name,
            part,
            title,
            "error",
            "–",
            f"{type(error).__name__}: {error}",
            time.monotonic() - started_s,
            {"traceback": detail},
        )
    else:
        status = "failed" if outcome.failures else "passed"
        reason = "; ".join(outcome.failures) if outcome.failures else None
        result = CheckResult(
            name, part, title, status, outcome.summary, reason, time.monotonic() - started_s, outcome.metrics
        )
    say(f"{name}: {result.status}" + (f" ({result.reason})" if result.reason else ""))
    return result


def skipped(name: str, part: str, title: str, reason: str) -> CheckResult:
    say(f"{name}: skipped ({reason})")
    return CheckResult(name, part, title, "skipped", "–", reason, 0.0, {})


def cuda_device() -> Any:
    """torch.device("cuda", 0), or Skip with the reason CUDA cannot be used."""
    import torch

    if torch.version.cuda is None:
        raise Skip(f"CUDA unavailable: this PyTorch ({torch.__version__}) was built without CUDA")
    if not torch.cuda.is_available():
        raise Skip(f"CUDA unavailable: PyTorch {torch.__version__} sees no CUDA GPU (driver, CUDA_VISIBLE_DEVICES)")
    return torch.device("cuda", 0)
