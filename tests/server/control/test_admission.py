"""Admission control against a real gateway and vLLM: beyond the cap and the line, 429 at once."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from openai import OpenAI, RateLimitError
from prometheus_client.parser import text_string_to_metric_families

from server.control.admission import AdmissionMiddleware, Slots
from server.control.hybrid_routing import SCOPE_KEY, RouteDecision
from tests.support import Stack, gateway_stats, http_get, post_json, running_stack, wait_for

ANSWER_TOKENS = 64


def test_requests_beyond_the_cap_and_the_line_get_429_and_admitted_ones_finish(stack: Stack, tmp_path: Path) -> None:
    with running_stack(
        ["--upstream", stack.vllm_url, "--max-in-flight", "1", "--max-queue", "1"], tmp_path / "gateway.log"
    ) as gateway:
        client = OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0)
        finished: list[int] = []
        failures: list[BaseException] = []

        def answer() -> None:
            try:
                reply = client.completions.create(
                    model="student", prompt="Xin chào", max_tokens=ANSWER_TOKENS, extra_body={"ignore_eos": True}
                )
                finished.append(reply.usage.completion_tokens)
            except BaseException as exc:
                failures.append(exc)

        # Warm up: the client's first call (lazy imports) and the gateway's first request (it
        # learns the served models) can take seconds on a busy box, which would reorder the three.
        client.completions.create(model="student", prompt="Xin chào", max_tokens=2)
        workers = [threading.Thread(target=answer) for _ in range(2)]
        with stack.engine_paused():  # nothing finishes while the line is filled, however fast the box
            workers[0].start()
            assert wait_for(lambda: admission(gateway)["answering"] == 1, 30), (admission(gateway), failures)
            workers[1].start()
            assert wait_for(lambda: admission(gateway)["waiting"] == 1, 30), (admission(gateway), failures)
            with pytest.raises(RateLimitError) as refused:
                client.completions.create(model="student", prompt="Xin chào", max_tokens=2)
            assert admission(gateway) == {
                "max_in_flight": 1,
                "max_queue": 1,
                "answering": 1,
                "waiting": 1,
                "rejected": 1,
            }
            assert admission_metrics(gateway) == {
                "student_admission_answering_requests": 1.0,
                "student_admission_waiting_requests": 1.0,
                "student_admission_max_in_flight_requests": 1.0,
                "student_admission_max_queue_requests": 1.0,
                "student_admission_rejected_requests_total{reason=queue_full}": 1.0,
                "student_admission_rejected_requests_total{reason=upstream_not_ready}": 0.0,
            }
        for worker in workers:
            worker.join(120)
        assert refused.value.response.headers["Retry-After"] == "1" and "at capacity" in refused.value.message
        # The one that had waited for a slot was answered (200), not refused.
        assert not failures and finished == [ANSWER_TOKENS, ANSWER_TOKENS]
        status, body = post_json(
            f"{gateway.url}/v1/completions", {"model": "student", "prompt": "a", "max_tokens": 2, "ignore_eos": True}
        )
        assert status == 200 and body["usage"]["completion_tokens"] == 2  # capacity is back
        assert admission(gateway)["answering"] == admission(gateway)["waiting"] == 0


def admission(gateway: Stack) -> dict[str, int]:
    """The gateway's admission line (its /stats `admission`)."""
    return gateway_stats(gateway.url)["admission"]


def admission_metrics(gateway: Stack) -> dict[str, float]:
    """The same line in the gateway's /metrics: every `student_admission_*` sample, labels in its key."""
    _, text = http_get(f"{gateway.url}/metrics")
    return {
        sample.name + "".join(f"{{{k}={v}}}" for k, v in sample.labels.items()): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
        if sample.name.startswith("student_admission_") and not sample.name.endswith("_created")
    }


def test_slots_say_when_the_next_request_would_be_refused_and_remote_requests_take_none() -> None:
    """In-process: what hybrid routing asks (`Slots.full`) before the middleware would refuse."""

    async def answer(scope, receive, send) -> None:  # a slow ASGI app
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


def test_refusals_are_counted_by_reason_queue_full_429_or_upstream_not_ready_503() -> None:
    """In-process: a full line answers 429 while the model server is ready, 503 while it is not."""
    ready = [True]

    async def hold(scope, receive, send) -> None:  # an ASGI app that answers when told
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def call(middleware: AdmissionMiddleware) -> int:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b""}

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "state": {}}
        await middleware(scope, receive, send)
        return sent[0]["status"]

    async def scenario() -> tuple[list[int], dict[str, int], int]:
        slots = Slots(max_in_flight=1, max_queue=0)
        middleware = AdmissionMiddleware(hold, slots, upstream_ready=lambda: ready[0])
        held = asyncio.ensure_future(call(middleware))
        await asyncio.sleep(0)
        statuses = [await call(middleware)]
        ready[0] = False
        statuses += [await call(middleware), await call(middleware)]
        release.set()
        statuses.append(await held)
        return statuses, dict(slots.refusals), slots.status()["rejected"]

    release = asyncio.Event()
    statuses, refusals, rejected = asyncio.run(scenario())
    assert statuses == [429, 503, 503, 200]
    assert refusals == {"queue_full": 1, "upstream_not_ready": 2} and rejected == 3
