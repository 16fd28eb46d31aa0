"""Bad input: what the gateway refuses itself, how it says so, and what it lets through.

The first half tests `server/gateway/validation.py` and `server/gateway/catalog.py` alone (fast, no vLLM); the
second sends the same mistakes to the real stack and checks the OpenAI-shaped answers, the
ledger and /stats, and that vLLM's own extra parameters still work.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
import timeit
from typing import Any

import pytest

from server.accounting.ledger import read_requests
from server.gateway.catalog import ModelCatalog
from server.gateway.validation import (
    ChatRequest,
    RequestError,
    ServedModels,
    check_served,
    check_unicode,
    openapi_body,
    parse_model_list,
    validate_chat,
    validate_completion,
)
from tests.support import Stack, http_get, post_json, wait_for

USER = {"role": "user", "content": "Đơn hàng của tôi đang ở đâu?"}
CHAT = {"model": "student", "messages": [USER], "max_tokens": 4, "temperature": 0}
COMPLETION = {"model": "student", "prompt": "Chính sách đổi trả", "max_tokens": 4, "temperature": 0}
VLLM_EXTRAS = {
    "top_k": 5,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "ignore_eos": True,
    "seed": 7,
    "stop_token_ids": [1],
    "skip_special_tokens": False,
    "min_tokens": 1,
    "logprobs": True,
    "top_logprobs": 2,
    "chat_template_kwargs": {"enable_thinking": False},
}
SERVED = ServedModels({"student": 4096}, "student")


def chat(**fields: Any) -> dict[str, Any]:
    return {**CHAT, **fields}


def refusal(result: object) -> tuple[int, str | None]:
    assert isinstance(result, RequestError), f"accepted: {result!r}"
    return result.status, result.param


# --- validation.py: the rules -------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        chat(),
        chat(**VLLM_EXTRAS),
        chat(stream=True, stream_options={"include_usage": True, "continuous_usage_stats": True}),
        chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}],
                }
            ]
        ),
        chat(
            messages=[
                {"role": "developer", "content": "be brief"},
                USER,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
                {"role": "function", "name": "f", "content": "42"},
            ]
        ),
        {"messages": [USER]},  # model is optional for vLLM: it answers with its first
        chat(stop="\n", n=2, max_completion_tokens=8, presence_penalty=-2, frequency_penalty=2, top_p=1, seed=-(2**63)),
        chat(logit_bias={"12": -100}, user="shop-1", tools=[{"type": "function", "function": {"name": "f"}}]),
    ],
    ids=["plain", "vllm-extras", "stream-options", "content-parts", "all-roles", "no-model", "ranges", "tools"],
)
def test_openai_and_vllm_chat_bodies_pass(body: dict[str, Any]) -> None:
    assert isinstance(validate_chat(body), ChatRequest)


@pytest.mark.parametrize(
    "prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]], None], ids=["str", "strs", "ids", "id-lists", "none"]
)
def test_completion_prompt_shapes_pass(prompt: object) -> None:
    assert not isinstance(
        validate_completion({**COMPLETION, "prompt": prompt, **VLLM_EXTRAS, "logprobs": 2}), RequestError
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(messages=[USER, {"role": "bot", "content": "x"}]), "messages[1].role"),
        (chat(messages=[{"content": "x"}]), "messages[0].role"),
        (chat(messages=[]), "messages"),
        ({"model": "student"}, "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[USER, "hi"]), "messages[1]"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
        (chat(messages=[{"role": "user", "content": [{"text": "hi"}]}]), "messages[0].content[0].type"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens=1.5), "max_tokens"),
        (chat(max_tokens="many"), "max_tokens"),
        (chat(max_completion_tokens=-1), "max_completion_tokens"),
        (chat(temperature=2.5), "temperature"),
        (chat(temperature=-0.1), "temperature"),
        (chat(temperature=float("nan")), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(n=0), "n"),
        (chat(n=10_000), "n"),
        (chat(presence_penalty=3), "presence_penalty"),
        (chat(seed=2**64), "seed"),
        (chat(stop=[1]), "stop[0]"),
        (chat(stream="true"), "stream"),
        (chat(stream=True, stream_options="usage"), "stream_options"),
        (chat(stream=True, stream_options={"include_usage": "sometimes"}), "stream_options.include_usage"),
        (chat(model=5), "model"),
        (chat(logit_bias={"12": "ban"}), "logit_bias.12"),
    ],
)
def test_bad_chat_fields_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    assert refusal(validate_chat(body)) == (400, param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**COMPLETION, "prompt": 5}, "prompt"),
        ({**COMPLETION, "prompt": [[1, -2]]}, "prompt[0][1]"),
        ({**COMPLETION, "echo": "loud"}, "echo"),
        ({**COMPLETION, "suffix": 3}, "suffix"),
        ({**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_completion_fields_are_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    assert refusal(validate_completion(body)) == (400, param)


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (rb'{"messages": [{"role": "user", "content": "a\ud800b"}]}', "messages[0].content"),
        (rb'{"prompt": ["ok", "\uDFFF"]}', "prompt[1]"),
        (rb'{"x": {"\udc00": 1}}', "x"),
    ],
)
def test_lone_surrogates_are_400(raw: bytes, param: str) -> None:
    assert refusal(check_unicode(raw, json.loads(raw))) == (400, param)


@pytest.mark.parametrize(
    "raw",
    [
        rb'{"content": "\ud83d\ude00"}',
        rb'{"content": "\\ud800 is how you write it"}',
        '{"content": "😀 đơn hàng"}'.encode(),
    ],
    ids=["escaped-pair", "escaped-backslash", "raw-utf8"],
)
def test_valid_unicode_passes(raw: bytes) -> None:
    assert check_unicode(raw, json.loads(raw)) is None


def test_refusal_message_names_the_field_and_the_allowed_values() -> None:
    error = validate_chat(chat(messages=[USER, {"role": "bot", "content": "x"}]))
    assert isinstance(error, RequestError)
    assert error.message.startswith("Invalid 'messages[1].role'")
    assert "'assistant'" in error.message and "'tool'" in error.message
    body = json.loads(error.response().body)
    assert body == {
        "error": {"message": error.message, "type": "invalid_request_error", "param": "messages[1].role", "code": 400}
    }


def test_extras_reach_vllm_untouched() -> None:
    """Validation reads the dict; it must never rewrite what is forwarded."""
    body = chat(**VLLM_EXTRAS)
    before = json.dumps(body)
    validate_chat(body)
    assert json.dumps(body) == before


def test_validating_a_typical_chat_body_costs_microseconds() -> None:
    """The gateway's CPU budget is ~7 ms per request; validation must be a small part of it."""
    body = chat(
        stream=True,
        stream_options={"include_usage": True},
        top_k=40,
        messages=[
            {"role": "system", "content": "Bạn là trợ lý cửa hàng."},
            USER,
            {"role": "assistant", "content": "Dạ."},
            USER,
        ],
    )
    runs = 2000
    seconds = min(timeit.repeat(lambda: check_served(validate_chat(body), SERVED), number=runs, repeat=3)) / runs
    assert seconds < 200e-6, f"{seconds * 1e6:.0f} µs per request"  # typically ~10-15 µs; slack for a busy box


# --- validation.py: model and context -----------------------------------------------------


def test_unknown_model_is_404_on_param_model() -> None:
    error = check_served(validate_chat(chat(model="gpt-5")), SERVED)
    assert refusal(error) == (404, "model")
    assert isinstance(error, RequestError) and "student" in error.message


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_more_tokens_than_the_context_is_400(field: str) -> None:
    assert check_served(validate_chat(chat(**{field: 4096})), SERVED) is None
    assert refusal(check_served(validate_chat(chat(**{field: 4097})), SERVED)) == (400, field)


def test_no_model_is_judged_against_the_default_one() -> None:
    request = validate_chat({"messages": [USER], "max_tokens": 10_000})
    assert refusal(check_served(request, SERVED)) == (400, "max_tokens")


def test_max_completion_tokens_is_not_a_completions_field() -> None:
    """vLLM ignores it on /v1/completions, so the gateway must not refuse for it."""
    request = validate_completion({**COMPLETION, "max_completion_tokens": 10**9})
    assert check_served(request, SERVED) is None


def test_nothing_is_refused_for_model_reasons_when_the_list_is_unknown() -> None:
    assert check_served(validate_chat(chat(model="gpt-5", max_tokens=10**9)), None) is None
    no_length = ServedModels({"student": None}, "student")
    assert check_served(validate_chat(chat(max_tokens=10**9)), no_length) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"object":"list","data":[{"id":"student","max_model_len":4096},{"id":"lora","max_model_len":null}]}',
            ServedModels({"student": 4096, "lora": None}, "student"),
        ),
        (b'{"data":[]}', ServedModels({}, None)),
        (b"<html>", None),
        (b'{"data":[5]}', None),
        (b'{"models":[]}', None),
    ],
)
def test_parse_model_list(body: bytes, expected: ServedModels | None) -> None:
    assert parse_model_list(body) == expected


def test_openapi_body_has_no_dangling_refs() -> None:
    text = json.dumps(openapi_body(ChatRequest))
    assert "$ref" not in text and "$defs" not in text
    assert '"additionalProperties": true' in text  # extras are part of the contract


# --- catalog.py: cache, refresh on a miss, rate limit ----------------------------------------


class FakeUpstream:
    def __init__(self, *answers: bytes | None):
        self.answers = list(answers)
        self.calls = 0

    async def fetch(self) -> bytes | None:
        self.calls += 1
        await asyncio.sleep(0)
        return self.answers[min(self.calls, len(self.answers)) - 1]


def models_body(*names: str) -> bytes:
    return json.dumps({"data": [{"id": name, "max_model_len": 4096} for name in names]}).encode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_catalog_fetches_once_then_answers_from_cache() -> None:
    upstream, clock = FakeUpstream(models_body("student")), Clock()
    catalog = ModelCatalog(min_refresh_s=2, max_age_s=60, clock=clock)

    async def run() -> None:
        for _ in range(5):
            served = await catalog.served("student", upstream.fetch)
            assert served is not None and "student" in served.max_model_len
        clock.now += 61  # stale: one refresh
        await catalog.served("student", upstream.fetch)

    asyncio.run(run())
    assert upstream.calls == 2


def test_a_flood_of_unknown_models_costs_one_upstream_call_per_interval() -> None:
    upstream, clock = FakeUpstream(models_body("student")), Clock()
    catalog = ModelCatalog(min_refresh_s=2, clock=clock)

    async def run() -> None:
        await catalog.served("student", upstream.fetch)
        clock.now += 5
        answers = await asyncio.gather(*(catalog.served(f"bad-{i}", upstream.fetch) for i in range(50)))
        assert all(a is not None and set(a.max_model_len) == {"student"} for a in answers)
        clock.now += 1
        await catalog.served("bad-again", upstream.fetch)

    asyncio.run(run())
    assert upstream.calls == 2  # the first fill, then one refresh shared by the flood


def test_catalog_learns_a_model_vllm_was_restarted_with() -> None:
    upstream, clock = FakeUpstream(models_body("student"), models_body("student-v2")), Clock()
    catalog = ModelCatalog(min_refresh_s=2, clock=clock)

    async def run() -> None:
        await catalog.served("student", upstream.fetch)
        clock.now += 3
        served = await catalog.served("student-v2", upstream.fetch)
        assert served is not None and set(served.max_model_len) == {"student-v2"}

    asyncio.run(run())


def test_catalog_is_unknown_while_the_upstream_does_not_answer() -> None:
    upstream, clock = FakeUpstream(models_body("student"), None), Clock()
    catalog = ModelCatalog(min_refresh_s=2, clock=clock)

    async def run() -> None:
        await catalog.served("student", upstream.fetch)
        clock.now += 3
        assert await catalog.served("other", upstream.fetch) is None

    asyncio.run(run())


def test_a_hanging_upstream_costs_at_most_the_fetch_timeout() -> None:
    async def hang() -> bytes | None:
        await asyncio.sleep(60)
        return None

    async def run() -> None:
        started = time.monotonic()
        assert await ModelCatalog(fetch_timeout_s=0.05).served("student", hang) is None
        assert time.monotonic() - started < 1

    asyncio.run(run())


# --- the real stack: answers, ledger, /stats ------------------------------------------------


def post_raw(stack: Stack, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def assert_openai_error(status: int, body: dict, expected_status: int, param: str | None) -> dict:
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["param"] == param, body
    assert body["error"]["message"], body
    return body["error"]


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"", b'{"messages": NaN}', b"\xff\xfe{}", b"[" * 100_000],
    ids=["broken", "empty", "nan", "bytes", "deep"],
)
def test_malformed_json_is_400(stack: Stack, raw: bytes) -> None:
    status, body = post_raw(stack, "/v1/chat/completions", raw)
    error = assert_openai_error(status, body, 400, None)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_lone_surrogate_is_400_not_a_crash(stack: Stack, stream: bool) -> None:
    """Found while fuzzing: re-encoding such a body for a stream raised inside the gateway (500)."""
    raw = b'{"model": "student", "max_tokens": 2, "stream": %s, "messages": [{"role": "user", "content": "\\ud800"}]}'
    status, body = post_raw(stack, "/v1/chat/completions", raw % (b"true" if stream else b"false"))
    assert_openai_error(status, body, 400, "messages[0].content")


def test_a_json_array_is_400(stack: Stack) -> None:
    status, body = post_raw(stack, "/v1/completions", b"[1, 2]")
    assert "JSON object" in assert_openai_error(status, body, 400, None)["message"]


def test_bad_role_is_400_with_param(stack: Stack) -> None:
    status, body = post_json(f"{stack.url}/v1/chat/completions", chat(messages=[USER, {"role": "bot", "content": "x"}]))
    assert_openai_error(status, body, 400, "messages[1].role")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model_is_404_with_param_model(stack: Stack, path: str) -> None:
    body = chat(model="no-such-model") if "chat" in path else {**COMPLETION, "model": "no-such-model"}
    status, answer = post_json(stack.url + path, body)
    assert_openai_error(status, answer, 404, "model")


def test_max_tokens_over_the_context_is_400(stack: Stack) -> None:
    status, body = post_json(f"{stack.url}/v1/chat/completions", chat(max_tokens=4097))  # the stack: 4096
    assert "4096" in assert_openai_error(status, body, 400, "max_tokens")["message"]


def test_declared_oversize_body_is_413_before_it_is_sent(stack: Stack) -> None:
    """Content-Length says 1 GB: the gateway answers without waiting for a byte of it."""
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n{"
        )
        status, body = read_response(sock)
    assert_openai_error(status, body, 413, None)


def test_chunked_oversize_body_is_413(stack: Stack) -> None:
    """No Content-Length: the gateway counts the chunks and stops past the limit (4 MiB)."""
    chunk = b"x" * 65536
    with socket.create_connection(("127.0.0.1", stack.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(5 * 1024 * 1024 // len(chunk)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway answered and closed before we were done: that is the point
        status, body = read_response(sock)
    assert_openai_error(status, body, 413, None)


def read_response(sock: socket.socket) -> tuple[int, dict]:
    received = b""
    while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_vllm_extras_still_work(stack: Stack, stream: bool) -> None:
    body = chat(**VLLM_EXTRAS, max_tokens=3, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=120)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    assert response.status == 200, raw
    if stream:
        events = [part.removeprefix(b"data: ") for part in raw.split(b"\n\n") if part.strip()]
        assert events[-1] == b"[DONE]"
        assert json.loads(events[-2])["usage"]["completion_tokens"] == 3  # ignore_eos: exactly max_tokens
    else:
        answer = json.loads(raw)
        assert answer["usage"]["completion_tokens"] == 3
        assert answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]


def test_completion_extras_and_token_prompt_still_work(stack: Stack) -> None:
    body = {**COMPLETION, "prompt": [5, 6, 7], "top_k": 3, "min_p": 0.1, "ignore_eos": True}
    status, body = post_json(f"{stack.url}/v1/completions", body)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 4


def test_a_request_without_model_is_forwarded(stack: Stack) -> None:
    status, body = post_json(f"{stack.url}/v1/chat/completions", {"messages": [USER], "max_tokens": 2})
    assert status == 200, body


def test_refusals_are_in_the_ledger_and_counted_as_errors(stack: Stack) -> None:
    def stats_requests() -> dict:
        return json.loads(http_get(f"{stack.url}/stats")[1])["requests"]

    before = stats_requests()
    since = time.time()
    post_json(f"{stack.url}/v1/chat/completions", chat(temperature=9))
    post_json(f"{stack.url}/v1/completions", {**COMPLETION, "model": "no-such-model"})
    post_raw(stack, "/v1/chat/completions", b"{oops")

    def refused_rows() -> list:
        return [row for row in read_requests(stack.ledger_path, since_unix=since) if row.upstream == "gateway"]

    assert wait_for(lambda: len(refused_rows()) >= 3, 5), read_requests(stack.ledger_path, since_unix=since)
    rows = refused_rows()
    assert sorted((row.route, row.status, row.model or "") for row in rows) == [
        ("/v1/chat/completions", 400, ""),  # not even JSON: no model to name
        ("/v1/chat/completions", 400, "student"),
        ("/v1/completions", 404, "no-such-model"),
    ]
    after = stats_requests()
    assert after["total"] - before["total"] >= 3
    assert after["error"] - before["error"] >= 3
