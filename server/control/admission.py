"""Admission control: a cap on answers in flight and on the gateway's waiting line.

vLLM runs `max_num_seqs` sequences at once and queues the rest without limit; under a flood its
queue, and every client's latency, would grow without bound. The gateway admits at most
`max_in_flight` generation requests at a time (by default twice vLLM's batch: a full batch plus
a full queue behind it), lets at most `max_queue` more wait for a slot (three batches), and answers
the rest at once with 429 and `Retry-After`, which the official OpenAI clients honour. So
admitted requests keep their latency and the gateway holds at most five batches' worth.

Refusals are counted by reason (`REFUSAL_REASONS`), for `/metrics`; `/stats` shows their sum.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from server.gateway.errors import error_response

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
QUEUE_FULL = "queue_full"  # 429: every slot taken and the line full
UPSTREAM_NOT_READY = "upstream_not_ready"  # 503: the same, while the model server is not ready
REFUSAL_REASONS = (QUEUE_FULL, UPSTREAM_NOT_READY)


class Slots:
    """What admission control keeps: answers in flight, requests waiting, refusals.

    Shared by the middleware and, with a remote upstream, by routing (`full`: would the next
    request be refused?), which must ask before the middleware refuses.
    """

    def __init__(self, max_in_flight: int, max_queue: int):
        if max_in_flight < 1 or max_queue < 0:
            raise ValueError("max_in_flight must be >= 1 and max_queue >= 0")
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.semaphore = asyncio.Semaphore(max_in_flight)
        self.in_flight = 0
        self.waiting = 0
        self.refusals = dict.fromkeys(REFUSAL_REASONS, 0)

    @property
    def rejected(self) -> int:
        """Refusals since start, whatever the reason."""
        return sum(self.refusals.values())

    @property
    def full(self) -> bool:
        """Every slot taken and the waiting line full: one more request would get 429."""
        return self.semaphore.locked() and self.waiting >= self.max_queue

    def status(self) -> dict[str, int]:
        """/stats `admission`: the limits, answers holding a slot, requests in line, refusals since start."""
        return {
            "max_in_flight": self.max_in_flight,
            "max_queue": self.max_queue,
            "answering": self.in_flight,
            "waiting": self.waiting,
            "rejected": self.rejected,
        }


class AdmissionMiddleware:
    """ASGI middleware holding a slot from admission until the answer's last byte is sent.

    `bypass(scope)`: requests that take no slot (those routed to the remote upstream).
    """

    def __init__(
        self,
        app: ASGIApp,
        slots: Slots,
        upstream_ready: Callable[[], bool] = lambda: True,
        retry_after_s: int = 1,
        bypass: Callable[[Scope], bool] = lambda scope: False,
    ):
        self._app = app
        self._slots = slots
        self._upstream_ready = upstream_ready
        self._retry_after_s = retry_after_s
        self._bypass = bypass

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in GENERATION_PATHS
            or self._bypass(scope)
        ):
            await self._app(scope, receive, send)
            return
        slots = self._slots
        if slots.full:
            reason = QUEUE_FULL if self._upstream_ready() else UPSTREAM_NOT_READY
            slots.refusals[reason] += 1
            await self._refusal(reason)(scope, receive, send)
            return
        slots.waiting += 1
        try:
            await slots.semaphore.acquire()
        finally:
            slots.waiting -= 1
        slots.in_flight += 1
        try:
            await self._app(scope, receive, send)
        finally:
            slots.in_flight -= 1
            slots.semaphore.release()

    def _refusal(self, reason: str):  # an ASGI response
        headers = {"Retry-After": str(self._retry_after_s)}
        if reason == UPSTREAM_NOT_READY:
            return error_response(503, "the model server is not ready; retry shortly", headers=headers)
        slots = self._slots
        return error_response(
            429,
            f"the gateway is at capacity ({slots.max_in_flight} answering, {slots.max_queue} waiting); retry shortly",
            type_="rate_limit_error",
            headers=headers,
        )
