"""Admission control against a real gateway and vLLM: beyond the cap and the line, 429 at once."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import asyncio

from openai import OpenAI, RateLimitError

from server.admission import AdmissionMiddleware, Slots
from server.routing import SCOPE_KEY, RouteDecision
from tests.support import Stack, http_get, post_json, start_stack, wait_for

# About 5 s on an idle box (1,500 tokens took 2 s): long enough for the test to line up three.
LONG = {"max_tokens": 3900, "extra_body": {"ignore_eos": True}}


def test_requests_beyond_the_cap_and_the_line_get_429_and_admitted_ones_finish(
    stack: Stack, tmp_path: Path
) -> None:
    gateway = start_stack(
        ["--upstream", stack.vllm_url, "--max-in-flight", "1", "--max-queue", "1"], tmp_path / "gateway.log"
    )
    try:
        gateway.wait_ready(60)
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        finished: list[int] = []

        def long_answer() -> None:
            answer = client.completions.create(model="student", prompt="Xin chào", **LONG)
            finished.append(answer.usage.completion_tokens)

        # Warm up: the client's first call (lazy imports) and the gateway's first request (it
        # learns the served models) can take seconds on a busy box, which would reorder the three.
        client.completions.create(model="student", prompt="Xin chào", max_tokens=2)
        workers = [threading.Thread(target=long_answer) for _ in range(2)]
        workers[0].start()
        assert wait_for(lambda: answering(gateway) >= 1, 30), "the first long answer never started"
        workers[1].start()
        time.sleep(0.5)  # the first is answering, the second waits in line
        try:
            client.completions.create(model="student", prompt="Xin chào", max_tokens=2)
            refused = None
        except RateLimitError as error:
            refused = error
        for worker in workers:
            worker.join(120)
        assert refused is not None, "a third request must be refused while one answers and one waits"
        assert refused.response.headers["Retry-After"] == "1" and "at capacity" in refused.message
        # A request that had waited for a slot would have been answered (200), not refused.
        assert finished == [3900, 3900]
        status, body = post_json(f"{gateway.url}/v1/completions", {"model": "student", "prompt": "a", "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2  # capacity is back
    finally:
        gateway.stop()


def answering(gateway: Stack) -> int:
    """Requests the gateway has admitted and sent upstream (its /stats `requests.in_flight`)."""
    status, body = http_get(f"{gateway.url}/stats")
    return json.loads(body)["requests"]["in_flight"] if status == 200 else 0


def test_slots_say_when_the_next_request_would_be_refused_and_remote_requests_take_none() -> None:
    """In-process: what hybrid routing asks (`Slots.full`) before the middleware would refuse."""

    async def answer(scope, receive, send) -> None:  # noqa: ANN001  a slow ASGI app
        await asyncio.sleep(0.2)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario() -> tuple[list[bool], list[int]]:
        slots = Slots(max_in_flight=1, max_queue=1)
        middleware = AdmissionMiddleware(answer, slots, bypass=lambda scope: SCOPE_KEY in scope["state"])
        full: list[bool] = []

        async def call(remote: bool = False) -> int:
            sent: list[dict] = []
            state = {SCOPE_KEY: RouteDecision("remote", "header")} if remote else {}
            scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "state": state}

            async def send(message: dict) -> None:
                sent.append(message)

            async def receive() -> dict:
                return {"type": "http.request", "body": b""}

            await middleware(scope, receive, send)
            return sent[0]["status"]

        first = asyncio.ensure_future(call())
        await asyncio.sleep(0)
        full.append(slots.full)  # one answering, nobody waiting: one more may wait
        second = asyncio.ensure_future(call())
        await asyncio.sleep(0)
        full.append(slots.full)  # answering and waiting: the next would be refused
        statuses = await asyncio.gather(call(), call(remote=True), first, second)
        return full, [*statuses, slots.rejected]

    full, statuses = asyncio.run(scenario())
    assert full == [False, True]
    assert statuses == [429, 200, 200, 200, 1]  # refused, remote (no slot), the two admitted; one rejection
