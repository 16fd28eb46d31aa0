"""One load process's share of the arrival schedule, consumed by its Locust users.

Open loop: a user takes the next arrival, sleeps until it is due and sends it, so requests go out
at the schedule's times whatever the server's response time. With enough users there is always
one free when the next arrival is due; when none is, arrivals go out late, which `Sample.late_s`
records and the report flags (`generator.lagging`). No Locust here.
"""

from __future__ import annotations

import time
from typing import Any

from loadtest.arrivals import Arrival
from loadtest.results import Sample
from loadtest.workload import Workload

FEED_ATTRIBUTE = "open_loop_feed"  # the feed hangs on the Locust Environment under this name


class ArrivalFeed:
    def __init__(self, target: str, t0_epoch: float, arrivals: list[Arrival], workload: Workload, timeout_s: float):
        self.target = target.rstrip("/")
        self.t0_epoch = t0_epoch
        self.arrivals = arrivals
        self.workload = workload
        self.timeout_s = timeout_s
        self.in_flight = 0
        self._next = 0
        self._done: list[Sample] = []

    @property
    def remaining(self) -> int:
        return len(self.arrivals) - self._next

    def take(self) -> Arrival | None:
        """The next arrival nobody has taken yet, or None when the schedule is used up."""
        if self._next >= len(self.arrivals):
            return None
        arrival = self.arrivals[self._next]
        self._next += 1
        return arrival

    def seconds_until(self, arrival: Arrival) -> float:
        return self.t0_epoch + arrival.offset_s - time.time()

    def record(self, sample: Sample) -> None:
        self._done.append(sample)

    def drain(self) -> list[Sample]:
        """Finished samples since the last drain."""
        done, self._done = self._done, []
        return done

    def to_plan(self) -> dict[str, Any]:
        """This feed as a message for a worker process (plain lists and dicts)."""
        return {
            "target": self.target,
            "t0_epoch": self.t0_epoch,
            "arrivals": [[a.index, a.offset_s, a.phase] for a in self.arrivals],
            "workload": self.workload.to_dict(),
            "timeout_s": self.timeout_s,
        }

    @classmethod
    def from_plan(cls, plan: dict[str, Any]) -> ArrivalFeed:
        arrivals = [Arrival(int(i), float(offset), str(phase)) for i, offset, phase in plan["arrivals"]]
        return cls(plan["target"], plan["t0_epoch"], arrivals, Workload.from_dict(plan["workload"]), plan["timeout_s"])

    def share(self, worker: int, workers: int) -> ArrivalFeed:
        """The feed of worker `worker` of `workers`: every `workers`-th arrival, starting at `worker`."""
        return ArrivalFeed(self.target, self.t0_epoch, self.arrivals[worker::workers], self.workload, self.timeout_s)
