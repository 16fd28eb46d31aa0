"""The teacher client against a scripted HTTP server: retries, Retry-After, timeouts, refusals, usage.

The end-to-end tests with real 429s from the project's own gateway are in test_command.py (they
share its one running stack); here a small aiohttp server plays each failure on cue, over real
HTTP, and the client's sleeps are recorded instead of waited.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from aiohttp import web

from models.distill.teacher import (
    ChatReply,
    Price,
    RequestPacer,
    RetryPolicy,
    TeacherClient,
    TeacherConfig,
    TeacherRejectedError,
    TeacherReplyError,
    TeacherUnavailableError,
    error_text,
    parse_chat_reply,
    parse_retry_after_s,
)

KEY = "sk-test-0123456789abcdef"
Action = Callable[[web.Request], Awaitable[web.StreamResponse]]


def completion(content: str = "Dạ, đơn hàng của bạn đang được giao.", **message: object) -> dict:
    return {
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def ok(body: dict | None = None) -> Action:
    async def action(request: web.Request) -> web.StreamResponse:
        return web.json_response(body or completion())

    return action


def status(code: int, retry_after: str | None = None, message: str = "busy") -> Action:
    async def action(request: web.Request) -> web.StreamResponse:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return web.json_response(
            {"error": {"message": message, "type": "x", "code": code}}, status=code, headers=headers
        )

    return action


def slow(delay_s: float) -> Action:
    async def action(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(delay_s)
        return web.json_response(completion())

    return action


def hang_up() -> Action:
    async def action(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    return action


@dataclass
class Scripted:
    url: str
    requests: list[dict] = field(default_factory=list)


@contextlib.asynccontextmanager
async def scripted_teacher(
    script: list[Action],
    models: list[str] | None = None,
    models_script: list[Action] | None = None,
    port: int = 0,
) -> AsyncIterator[Scripted]:
    """A server on 127.0.0.1:`port` (0: any free one) whose POST /v1/chat/completions plays `script`
    in order, then answers 200. GET /v1/models plays `models_script`, then lists `models` (404 when None).
    """
    pending = list(script)
    pending_models = list(models_script or [])
    server = Scripted(url="")

    async def chat(request: web.Request) -> web.StreamResponse:
        server.requests.append({"headers": dict(request.headers), "body": await request.json()})
        return await (pending.pop(0) if pending else ok())(request)

    async def list_models(request: web.Request) -> web.StreamResponse:
        if pending_models:
            return await pending_models.pop(0)(request)
        if models is None:
            return web.json_response({"error": {"message": "not found"}}, status=404)
        return web.json_response({"object": "list", "data": [{"id": name} for name in models]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", list_models)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    server.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield server
    finally:
        await runner.cleanup()


class Sleeps(list):
    """A stand-in for asyncio.sleep that records the seconds asked for and returns at once."""

    async def __call__(self, seconds: float) -> None:
        self.append(seconds)
        await asyncio.sleep(0)


def config(url: str, **overrides: object) -> TeacherConfig:
    settings: dict = {"url": url, "model": "teacher", "api_key": KEY, "retry": RetryPolicy(3, 1.0, 8.0)}
    settings.update(overrides)
    return TeacherConfig(**settings)


async def chat_once(teacher_config: TeacherConfig, sleeps: Sleeps) -> tuple[ChatReply, TeacherClient]:
    async with TeacherClient(teacher_config, rng=random.Random(0), sleep=sleeps) as client:
        reply = await client.chat(
            [{"role": "user", "content": "Đơn của mình đâu?"}], max_tokens=16, temperature=0.0, seed=7
        )
    return reply, client


# --- pure functions ---


def test_retry_after_is_read_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after_s("2") == 2.0
    assert parse_retry_after_s(" 1.5 ") == 1.5
    assert parse_retry_after_s("-3") == 0.0
    assert parse_retry_after_s(None) is None
    assert parse_retry_after_s("soon") is None
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after_s(format_datetime(now + timedelta(seconds=30), usegmt=True), now.timestamp()) == 30.0


def test_backoff_doubles_with_jitter_and_honours_retry_after() -> None:
    policy = RetryPolicy(max_retries=5, base_delay_s=1.0, max_delay_s=6.0)
    rng = random.Random(1)
    for retry, ceiling_s in enumerate([1.0, 2.0, 4.0, 6.0, 6.0]):
        delays = [policy.delay_s(retry, None, rng) for _ in range(50)]
        assert all(ceiling_s / 2 <= delay <= ceiling_s for delay in delays)
        assert len(set(delays)) > 1  # jittered
    assert all(7.0 <= policy.delay_s(0, 7.0, rng) <= 8.0 for _ in range(20))  # Retry-After + < base


def test_error_text_prefers_the_openai_message_and_stays_short() -> None:
    assert error_text(429, b'{"error": {"message": "slow down"}}') == "HTTP 429: slow down"
    assert error_text(502, b"<html>Bad gateway</html>") == "HTTP 502: <html>Bad gateway</html>"
    assert len(error_text(500, b"x" * 5000)) < 320


def test_reply_parsing_keeps_reasoning_apart_and_counts_missing_usage() -> None:
    reply = parse_chat_reply(completion("Trả lời.", reasoning_content="Suy nghĩ."), attempts=2)
    assert (reply.content, reply.reasoning, reply.attempts, reply.prompt_tokens) == ("Trả lời.", "Suy nghĩ.", 2, 11)
    assert parse_chat_reply(completion("A", reasoning="R"), 1).reasoning == "R"  # vLLM 0.32's field name
    assert parse_chat_reply(completion("A", reasoning=None), 1).reasoning is None
    bare = parse_chat_reply({"choices": [{"message": {"content": None}}]}, 1)
    assert (bare.content, bare.has_usage, bare.prompt_tokens) == ("", False, 0)
    with pytest.raises(TeacherReplyError):
        parse_chat_reply({"choices": []}, 1)


def test_price_is_per_million_tokens() -> None:
    assert Price(0.28, 0.42).cost_usd(1_000_000, 500_000) == pytest.approx(0.49)


def test_config_hides_the_key_and_refuses_reserved_extras() -> None:
    assert KEY not in repr(config("http://127.0.0.1:1/v1"))
    with pytest.raises(ValueError, match="model"):
        config("http://127.0.0.1:1/v1", extra_body={"model": "other"})
    with pytest.raises(ValueError, match="http"):
        config("127.0.0.1:1/v1")


def test_pacer_spaces_request_starts() -> None:
    sleeps = Sleeps()
    pacer = RequestPacer(requests_per_minute=600, sleep=sleeps, clock_s=lambda: 100.0)  # 0.1 s apart

    async def three() -> None:
        for _ in range(3):
            await pacer.wait()

    asyncio.run(three())
    assert sleeps == pytest.approx([0.1, 0.2])


# --- against the scripted server ---


def test_5xx_and_429_are_retried_until_success_honouring_retry_after() -> None:
    sleeps = Sleeps()

    async def scenario() -> tuple[ChatReply, TeacherClient, Scripted]:
        async with scripted_teacher([status(503), status(429, retry_after="3"), status(502)]) as server:
            reply, client = await chat_once(config(server.url), sleeps)
        return reply, client, server

    reply, client, server = asyncio.run(scenario())
    assert reply.content.startswith("Dạ") and reply.attempts == 4
    assert client.usage.as_dict() | {"retries_by_reason": dict(client.usage.retries_by_reason)} == {
        "requests": 4,
        "replies": 1,
        "retries": 3,
        "retries_by_reason": {"503": 1, "429": 1, "502": 1},
        "replies_without_usage": 0,
        "prompt_tokens": 11,
        "completion_tokens": 7,
    }
    assert 0.5 <= sleeps[0] <= 1.0  # exponential: first retry in [base/2, base]
    assert 3.0 <= sleeps[1] <= 4.0  # Retry-After: 3, plus jitter below the base delay
    assert 2.0 <= sleeps[2] <= 4.0  # third retry: [2, 4]
    sent = server.requests[0]
    assert sent["headers"]["Authorization"] == f"Bearer {KEY}"
    assert sent["body"] == {
        "model": "teacher",
        "messages": [{"role": "user", "content": "Đơn của mình đâu?"}],
        "max_tokens": 16,
        "temperature": 0.0,
        "seed": 7,
    }


def test_gives_up_after_max_retries_with_the_last_error() -> None:
    sleeps = Sleeps()

    async def scenario() -> None:
        async with scripted_teacher([status(503, message="overloaded")] * 10) as server:
            await chat_once(config(server.url, retry=RetryPolicy(2, 0.5, 4.0)), sleeps)

    with pytest.raises(TeacherUnavailableError, match=r"failed 3 time.*HTTP 503: overloaded") as failure:
        asyncio.run(scenario())
    assert (failure.value.attempts, failure.value.reason) == (3, "503")
    assert KEY not in str(failure.value)


def test_timeouts_and_dropped_connections_are_retried() -> None:
    sleeps = Sleeps()

    async def scenario() -> tuple[ChatReply, TeacherClient]:
        async with scripted_teacher([slow(2.0), hang_up()]) as server:
            return await chat_once(config(server.url, timeout_s=0.3), sleeps)

    reply, client = asyncio.run(scenario())
    assert reply.attempts == 3
    assert dict(client.usage.retries_by_reason) == {"timeout": 1, "connection": 1}


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_teacher_is_unavailable_after_retries() -> None:
    sleeps = Sleeps()
    url = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(TeacherUnavailableError, match="connection") as failure:
        asyncio.run(chat_once(config(url, retry=RetryPolicy(1, 0.1, 1.0)), sleeps))
    assert failure.value.attempts == 2 and len(sleeps) == 1


@pytest.mark.parametrize(("code", "fatal"), [(401, True), (403, True), (404, True), (400, False), (422, False)])
def test_other_4xx_are_not_retried(code: int, fatal: bool) -> None:
    sleeps = Sleeps()

    async def scenario() -> None:
        async with scripted_teacher([status(code, message="nope")]) as server:
            await chat_once(config(server.url), sleeps)

    with pytest.raises(TeacherRejectedError, match=f"HTTP {code}: nope") as failure:
        asyncio.run(scenario())
    assert failure.value.fatal is fatal and failure.value.status == code
    assert sleeps == [] and KEY not in str(failure.value)


def test_a_401_says_which_variable_to_check_never_the_key() -> None:
    async def scenario(api_key: str | None) -> None:
        async with scripted_teacher([status(401, message="invalid API key")]) as server:
            await chat_once(config(server.url, api_key=api_key, key_env="SHOP_TEACHER_KEY"), Sleeps())

    with pytest.raises(TeacherRejectedError, match=r"check the key in \$SHOP_TEACHER_KEY") as failure:
        asyncio.run(scenario(KEY))
    assert KEY not in str(failure.value)
    with pytest.raises(TeacherRejectedError, match=r"no key was sent: set \$SHOP_TEACHER_KEY"):
        asyncio.run(scenario(None))


def test_extra_body_reaches_the_server_and_a_200_without_json_is_an_error() -> None:
    async def not_json(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>captive portal</html>")

    async def scenario() -> Scripted:
        async with scripted_teacher([ok(), not_json]) as server:
            teacher_config = config(server.url, extra_body={"top_k": 5, "max_tokens": 8})
            async with TeacherClient(teacher_config, sleep=Sleeps()) as client:
                await client.chat([{"role": "user", "content": "hi"}], max_tokens=16, temperature=0.5)
                with pytest.raises(TeacherReplyError, match="not JSON"):
                    await client.chat([{"role": "user", "content": "hi"}], max_tokens=16, temperature=0.5)
        return server

    server = asyncio.run(scenario())
    body = server.requests[0]["body"]
    assert body["top_k"] == 5 and body["max_tokens"] == 8 and "seed" not in body


def test_served_models_lists_ids_and_tolerates_servers_without_the_endpoint() -> None:
    async def scenario(models: list[str] | None) -> list[str] | None:
        async with scripted_teacher([], models=models) as server, TeacherClient(config(server.url)) as client:
            return await client.served_models()

    assert asyncio.run(scenario(["deepseek-reasoner", "deepseek-chat"])) == ["deepseek-reasoner", "deepseek-chat"]
    assert asyncio.run(scenario(None)) is None


def test_no_key_sends_no_authorization_header() -> None:
    async def scenario() -> Scripted:
        async with scripted_teacher([]) as server:
            await chat_once(config(server.url, api_key=None), Sleeps())
        return server

    assert "Authorization" not in asyncio.run(scenario()).requests[0]["headers"]


def test_preflight_retries_busy_answers_but_reports_an_unreachable_host_quickly() -> None:
    sleeps = Sleeps()

    async def busy_then_listed() -> list[str] | None:
        busy = [status(503), status(429, "1")]
        async with (
            scripted_teacher([], models=["student"], models_script=busy) as server,
            TeacherClient(config(server.url), sleep=sleeps) as client,
        ):
            return await client.served_models(max_connection_retries=0)

    assert asyncio.run(busy_then_listed()) == ["student"] and len(sleeps) == 2

    async def unreachable() -> None:
        async with TeacherClient(config(f"http://127.0.0.1:{closed_port()}/v1"), sleep=Sleeps()) as client:
            await client.served_models(max_connection_retries=0)

    with pytest.raises(TeacherUnavailableError, match="failed 1 time") as failure:
        asyncio.run(unreachable())
    assert failure.value.reason == "connection"
