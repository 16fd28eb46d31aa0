"""Several vLLM replicas behind one gateway: least outstanding requests, health checks, ejection.

Each request goes to the healthy replica with the fewest requests in flight through this
gateway (ties take turns, so equal replicas share the load). A replica leaves the rotation
("ejected") when

- its `/health` cannot be reached or answers other than 200: at once; it does not answer in
  time (a stall on a busy machine, perhaps): after `failures_to_eject` (3) checks in a row;
- a request could not even connect to it (connection refused): at once;
- `failures_to_eject` (3) requests in a row failed on it: answered with HTTP 5xx, including the
  gateway's own 502/503/504 for a lost connection or an upstream that went silent. A success
  (below 400) clears the count; 4xx (a bad request, a client that left) says nothing either way.

Request failures never eject the last healthy replica: with one upstream (or one left), a
transient error must not turn every following request into a 503. Only its health check can
take it out, which is exactly when `/ready` says 503 too.

An ejected replica comes back when its `/health` answers 200 again: at the next check after a
failed check, and no sooner than `cooldown_s` after request failures ejected it. One that came
back after request failures is on probation: its next failure ejects it again, before a
success clears the count.

`pick` and `release` run on the event loop for every request: they are O(replicas), with no
locks and no awaits. Health checks run in their own task (`run_health_checks`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

logger = logging.getLogger(__name__)

DEFAULT_FAILURES_TO_EJECT = 3
DEFAULT_COOLDOWN_S = 10.0


@dataclass(frozen=True, slots=True)
class Unhealthy:
    """A failed health check: why, in plain language, and whether that alone is enough to eject
    (false for a timeout, which may be a passing stall)."""

    reason: str
    certain: bool = True


# base URL -> None when the replica answers its /health with 200, else what went wrong.
Probe = Callable[[str], Awaitable[Unhealthy | None]]


class NoHealthyReplicaError(Exception):
    """Every replica is ejected; the message says why each one is."""


@dataclass(eq=False, slots=True)
class Replica:
    """One vLLM server: its load through this gateway, its health and its counters."""

    base_url: str
    outstanding: int = 0
    healthy: bool = True
    reason: str | None = None  # why it is ejected (None while healthy)
    requests: int = 0  # sent to it
    failures: int = 0  # of those, failed
    consecutive_failures: int = 0
    failed_checks: int = 0  # health checks in a row that did not answer in time
    ejected_by_requests: bool = False
    return_after_s: float = 0.0  # monotonic; an ejected replica is not taken back before this

    def status(self) -> dict[str, Any]:
        return {
            "url": self.base_url,
            "healthy": self.healthy,
            "outstanding": self.outstanding,
            "requests": self.requests,
            "failures": self.failures,
            "reason": self.reason,
        }


def health_probe(session: aiohttp.ClientSession, timeout_s: float) -> Probe:
    """GET `{base_url}/health` with `session`; the reasons read like `/ready`'s always did."""
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def probe(base_url: str) -> Unhealthy | None:
        try:
            async with session.get(base_url + "/health", timeout=timeout) as response:
                if response.status == 200:
                    return None
                return Unhealthy(f"upstream {base_url} /health answered HTTP {response.status}")
        except asyncio.TimeoutError:  # first: aiohttp's own timeouts are ClientErrors too
            return Unhealthy(f"upstream {base_url} did not answer /health in {timeout_s:g} s", certain=False)
        except aiohttp.ClientError as exc:  # (a stale pooled connection is retried by aiohttp itself)
            return Unhealthy(f"upstream {base_url} unreachable: {exc}")

    return probe


class Balancer:
    """Chooses a replica per request and keeps the replicas' health (see the module docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        probe: Probe,
        *,
        failures_to_eject: int = DEFAULT_FAILURES_TO_EJECT,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not urls:
            raise ValueError("a balancer needs at least one upstream URL")
        if failures_to_eject < 1:
            raise ValueError("failures_to_eject must be >= 1")
        self.replicas = [Replica(url) for url in urls]
        self._by_url = {replica.base_url: replica for replica in self.replicas}
        self._probe = probe
        self._failures_to_eject = failures_to_eject
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._turn = 0

    @property
    def urls(self) -> list[str]:
        return [replica.base_url for replica in self.replicas]

    def replica(self, url: str) -> Replica | None:
        """The replica with this base URL (None for anything else, e.g. "gateway")."""
        return self._by_url.get(url)

    # --- the request path -----------------------------------------------------------------

    def pick(self, exclude: Collection[Replica] = ()) -> Replica:
        """The healthy replica (not in `exclude`) with the fewest requests in flight; count one more.

        Raises NoHealthyReplicaError when there is none. Every pick needs exactly one `release`.
        """
        replicas = self.replicas
        count = len(replicas)
        start = self._turn  # ties go to the first one from a turning start: equal replicas alternate
        self._turn = start + 1 if start + 1 < count else 0
        best: Replica | None = None
        for offset in range(count):
            replica = replicas[start + offset - count]  # negative indexes wrap around
            if replica.healthy and (best is None or replica.outstanding < best.outstanding) and replica not in exclude:
                best = replica
        if best is None:
            raise NoHealthyReplicaError(self.unhealthy_reasons())
        best.outstanding += 1
        best.requests += 1
        return best

    def release(self, replica: Replica, status: int, refused: bool = False) -> None:
        """A picked request finished with HTTP `status` (as the client got it; 5xx is a failure).
        `refused`: the replica could not even be connected to (ejected at once)."""
        replica.outstanding -= 1
        if status < 500:
            if status < 400:
                replica.consecutive_failures = 0
            return
        replica.failures += 1
        replica.consecutive_failures += 1
        if not replica.healthy or not self._others_healthy(replica):
            return
        if refused:
            self._eject(replica, f"upstream {replica.base_url} refused a connection", by_requests=True)
        elif replica.consecutive_failures >= self._failures_to_eject:
            reason = f"upstream {replica.base_url}: {replica.consecutive_failures} requests in a row failed"
            self._eject(replica, reason, by_requests=True)

    # --- health -----------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Probe every replica's /health once (concurrently); eject and take back accordingly."""
        results = await asyncio.gather(*(self._probe(replica.base_url) for replica in self.replicas))
        for replica, problem in zip(self.replicas, results, strict=True):
            self.note_health(replica, problem)

    def note_health(self, replica: Replica, problem: Unhealthy | None) -> None:
        """Apply one health-check result (None: answered 200) to `replica`."""
        if problem is not None:
            replica.failed_checks = 0 if problem.certain else replica.failed_checks + 1
            if not replica.healthy:
                replica.reason = problem.reason  # still out: the latest reason, logged no more
            elif problem.certain or replica.failed_checks >= self._failures_to_eject:
                self._eject(replica, problem.reason, by_requests=False)
            return
        replica.failed_checks = 0
        if replica.healthy or self._clock() < replica.return_after_s:
            return
        replica.healthy = True
        replica.reason = None
        if replica.ejected_by_requests:  # on probation: one more failure ejects it again
            replica.consecutive_failures = self._failures_to_eject - 1
        else:
            replica.consecutive_failures = 0
        replica.ejected_by_requests = False
        logger.info("replica %s back: /health answers 200 again", replica.base_url)

    async def run_health_checks(self, interval_s: float = 2.0) -> None:
        """Check every replica each `interval_s` seconds until cancelled."""
        while True:
            try:
                await self.check_health()
            except Exception:  # a bug here must not stop the checks for good
                logger.exception("health check failed")
            await asyncio.sleep(interval_s)

    async def check_ready(self) -> str | None:
        """Check now; None when at least one replica is healthy, else why none is."""
        await self.check_health()
        if any(replica.healthy for replica in self.replicas):
            return None
        return self.unhealthy_reasons()

    def unhealthy_reasons(self) -> str:
        """Why each ejected replica is out, `; `-separated."""
        reasons = [replica.reason or replica.base_url for replica in self.replicas if not replica.healthy]
        return "; ".join(reasons) if reasons else "every healthy upstream was tried"

    def status(self) -> list[dict[str, Any]]:
        """Each replica's url, health, reason, requests in flight and counters (for /stats, /ready)."""
        return [replica.status() for replica in self.replicas]

    # --- internals --------------------------------------------------------------------------

    def _others_healthy(self, replica: Replica) -> bool:
        return any(other.healthy for other in self.replicas if other is not replica)

    def _eject(self, replica: Replica, reason: str, by_requests: bool) -> None:
        replica.healthy = False
        replica.reason = reason
        replica.ejected_by_requests = by_requests
        replica.return_after_s = self._clock() + self._cooldown_s if by_requests else 0.0
        logger.warning("replica %s ejected: %s", replica.base_url, reason)
