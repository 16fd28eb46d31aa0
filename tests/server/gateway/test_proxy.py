"""The request path end to end: gateway → real vLLM (tiny model), over real HTTP."""

from __future__ import annotations

import http.client
import json
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from server.control.admission import GENERATION_PATHS
from tests.conftest import LONG_CONTEXT_TOKENS, LONG_STACK_ARGS
from tests.support import (
    VLLM_READY_TIMEOUT_S,
    Stack,
    http_get,
    metric_samples,
    open_raw_request,
    post_json,
    read_headers,
    running_stack,
    start_stack,
    vllm_gauge,
    wait_for,
)

CHAT = {
    "model": "student",
    "messages": [{"role": "user", "content": "Đơn hàng của tôi đang ở đâu?"}],
    "max_tokens": 24,
    "temperature": 0,
    "seed": 7,
}
COMPLETION = {"model": "student", "prompt": "Chính sách đổi trả", "max_tokens": 24, "temperature": 0, "seed": 7}
# Long enough (ignore_eos, on the long-context model) that the request is still running when
# the test disconnects.
LONG = {"max_tokens": LONG_CONTEXT_TOKENS - 200, "ignore_eos": True, "temperature": 0}
PATHS = {"chat": ("/v1/chat/completions", CHAT), "completions": ("/v1/completions", COMPLETION)}


def stream_events(port: int, path: str, body: dict) -> list[bytes]:
    """POST with stream=true and return each SSE event's data payload, in order."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert response.getheader("content-type", "").startswith("text/event-stream")
    events = [part for part in response.read().split(b"\n\n") if part.strip()]
    connection.close()
    return [event.removeprefix(b"data: ") for event in events]


def streamed_text(events: list[bytes]) -> str:
    text = []
    for data in events:
        if data == b"[DONE]":
            continue
        choice = json.loads(data)["choices"][0]
        text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(text)


def answer_text(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["text"] if "text" in choice else choice["message"]["content"]


class EventTally:
    """SSE events received so far on a raw socket, read without blocking the test."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.received = b""

    def at_least(self, count: int) -> bool:
        self._sock.settimeout(0.05)
        try:
            while self.received.count(b"data: ") < count:
                chunk = self._sock.recv(65536)
                assert chunk, f"stream ended early: {self.received[-500:]!r}"
                self.received += chunk
        except TimeoutError:
            pass
        finally:
            self._sock.settimeout(60)
        return self.received.count(b"data: ") >= count


def gateway_in_flight(stack: Stack) -> int:
    """Requests the gateway has sent upstream and not finished (its /stats `requests.in_flight`)."""
    status, body = http_get(f"{stack.url}/stats")
    return json.loads(body)["requests"]["in_flight"] if status == 200 else -1


def gateway_state(stack: Stack) -> str:
    """For failure messages: the gateway's own count of requests and the end of its log."""
    status, body = http_get(f"{stack.url}/stats")
    requests = json.loads(body).get("requests") if status == 200 else body[:300]
    return f"gateway requests: {requests}\nlog:\n{stack.log()[-3000:]}"


def vllm_load(stack: Stack) -> tuple[float, float]:
    """(running, waiting) requests in vLLM right now."""
    return (
        vllm_gauge(stack.vllm_url, "vllm:num_requests_running"),
        vllm_gauge(stack.vllm_url, "vllm:num_requests_waiting"),
    )


def assert_idle_soon(
    stack: Stack, timeout_s: float = 60.0, why: str = "vLLM still holds the request after the client disconnected"
) -> None:
    assert wait_for(lambda: vllm_load(stack) == (0, 0), timeout_s), f"{why}: (running, waiting) = {vllm_load(stack)}"


def vllm_handled(stack: Stack) -> int:
    """Generation requests vLLM's API server is done with: answered, or dropped because the
    client left (its `http_requests_total`, counted when the handler ends).

    A dropped request's abort is sent to the engine before that, so waiting for it while the
    engine is frozen means the engine sees the abort before its next step. Resumed earlier, the
    engine may run the request on while a starved API server (two cores) has not yet noticed the
    disconnect (a fresh-clone run saw a dropped 16,184-token request run to its end).
    """
    samples = metric_samples(stack.vllm_url, "http_requests_total")
    return sum(int(value) for labels, value in samples if labels.get("handler") in GENERATION_PATHS)


def finish_counts(stack: Stack) -> Counter[str]:
    """vLLM's finished requests by reason (`abort`, `length`, `stop`, ...), from its counters."""
    counts: Counter[str] = Counter()
    for labels, value in metric_samples(stack.vllm_url, "vllm:request_success_total"):
        counts[labels["finished_reason"]] += int(value)
    return counts


def assert_aborted(stack: Stack, before: Counter[str]) -> None:
    """vLLM is idle again and, since `before`, no request ran to its end (`length` or `stop`).

    vLLM counts only requests that finished in its engine, not those its API server aborted, so
    "went idle without finishing one" is the sign the gateway aborted them: how quickly the slot
    came free is not (a long request would free it too, just later).
    """
    assert_idle_soon(stack)
    ended = finish_counts(stack)
    ended.subtract(before)
    assert (ended["length"], ended["stop"]) == (0, 0), (
        f"a request ran to its end instead of being aborted: {dict(ended)}"
    )


@pytest.fixture(scope="module")
def own_stack(long_context_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of this module's own for the disconnect tests.

    They read vLLM's running/waiting gauges, and on the shared session stack earlier tests' load
    (the load-test scenarios run before this module) left those gauges and the engine's
    scheduling in states that made these checks fail now and then.
    """
    log_path = tmp_path_factory.mktemp("own") / "serve.log"
    args = ["--model", str(long_context_model_dir), *LONG_STACK_ARGS]
    with running_stack(args, log_path, ready_timeout_s=VLLM_READY_TIMEOUT_S) as running:
        yield running


@pytest.fixture
def idle_stack(own_stack: Stack) -> Stack:
    """This module's stack once vLLM has finished whatever the previous test left in flight."""
    assert_idle_soon(own_stack, why="vLLM was still busy before the test")
    return own_stack


@pytest.mark.parametrize("kind", PATHS)
def test_non_streaming_answer_equals_vllm_direct(stack: Stack, kind: str) -> None:
    path, body = PATHS[kind]
    via_gateway = post_json(stack.url + path, body)
    direct = post_json(stack.vllm_url + path, body)
    assert via_gateway[0] == direct[0] == 200
    assert answer_text(via_gateway[1]) == answer_text(direct[1])
    assert answer_text(via_gateway[1])
    assert via_gateway[1]["usage"] == direct[1]["usage"]


@pytest.mark.parametrize("kind", PATHS)
def test_stream_equals_vllm_direct_event_for_event(stack: Stack, kind: str) -> None:
    path, body = PATHS[kind]
    via_gateway = stream_events(stack.port, path, body)
    direct = stream_events(stack.vllm_port, path, body)
    assert len(via_gateway) == len(direct) > 3
    assert via_gateway[-1] == b"[DONE]"
    assert streamed_text(via_gateway) == streamed_text(direct) != ""


def last_request_line(stack: Stack) -> dict[str, str]:
    lines = [line for line in stack.log().splitlines() if line.startswith("[request] ")]
    assert lines, "the gateway logged no request line"
    return dict(part.split("=", 1) for part in lines[-1].split()[2:])


@pytest.mark.parametrize("kind", PATHS)
def test_stream_usage_is_measured_but_only_sent_when_asked(stack: Stack, kind: str) -> None:
    path, body = PATHS[kind]
    asked = stream_events(stack.port, path, {**body, "stream_options": {"include_usage": True}})
    usage = json.loads(asked[-2])["usage"]
    assert json.loads(asked[-2])["choices"] == [] and usage["completion_tokens"] == body["max_tokens"]
    direct = stream_events(stack.vllm_port, path, {**body, "stream_options": {"include_usage": True}})
    assert json.loads(direct[-2])["usage"] == usage

    not_asked = stream_events(stack.port, path, body)
    assert all(b'"usage"' not in event for event in not_asked)
    assert wait_for(lambda: last_request_line(stack)["completion_tokens"] == str(usage["completion_tokens"]), 2)
    logged = last_request_line(stack)
    assert logged["status"] == "200" and logged["stream"] == "1"
    assert logged["prompt_tokens"] == str(usage["prompt_tokens"])
    # Under load vLLM may deliver every token in one burst, so TPOT can honestly round to 0.0.
    assert float(logged["ttft_ms"]) <= float(logged["e2e_ms"]) and float(logged["tpot_ms"]) >= 0


def test_non_streaming_usage_is_logged(stack: Stack) -> None:
    status, answer = post_json(stack.url + "/v1/chat/completions", CHAT)
    assert status == 200
    assert wait_for(lambda: last_request_line(stack)["stream"] == "0", 2)
    logged = last_request_line(stack)
    assert logged["prompt_tokens"] == str(answer["usage"]["prompt_tokens"])
    assert logged["completion_tokens"] == str(answer["usage"]["completion_tokens"])
    assert logged["ttft_ms"] == "-" and float(logged["e2e_ms"]) > 0


def test_official_openai_client_streams_a_chat(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model="student", messages=CHAT["messages"], max_tokens=24, temperature=0, seed=7, stream=True
    )
    chunks = [chunk for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3
    assert text == streamed_text(stream_events(stack.vllm_port, *PATHS["chat"]))


def test_models_lists_the_served_model(stack: Stack) -> None:
    status, body = http_get(f"{stack.url}/v1/models")
    assert status == 200
    assert [model["id"] for model in json.loads(body)["data"]] == ["student"]


def test_disconnect_mid_stream_aborts_the_vllm_request(idle_stack: Stack) -> None:
    before, handled = finish_counts(idle_stack), vllm_handled(idle_stack)
    with idle_stack.engine_paused():  # however fast the box, the request cannot finish meanwhile
        sock = open_raw_request(idle_stack.port, "/v1/completions", {**COMPLETION, **LONG, "stream": True})
        assert read_headers(sock).startswith(b"HTTP/1.1 200"), gateway_state(idle_stack)
        tally = EventTally(sock)
        assert idle_stack.step_engine_until(lambda: tally.at_least(3)), gateway_state(idle_stack)
        sock.close()
        assert wait_for(lambda: gateway_in_flight(idle_stack) == 0, 60), gateway_state(idle_stack)
        assert wait_for(lambda: vllm_handled(idle_stack) == handled + 1, 60), gateway_state(idle_stack)
    assert_aborted(idle_stack, before)


def test_disconnect_before_first_token_aborts_the_queued_request(idle_stack: Stack) -> None:
    # The stack runs at most 2 sequences: fill both, so the third waits for its first token.
    before, handled = finish_counts(idle_stack), vllm_handled(idle_stack)
    with idle_stack.engine_paused():
        busy = [
            open_raw_request(idle_stack.port, "/v1/completions", {**COMPLETION, **LONG, "stream": True})
            for _ in range(2)
        ]
        for sock in busy:
            assert read_headers(sock).startswith(b"HTTP/1.1 200"), gateway_state(idle_stack)
        assert idle_stack.step_engine_until(lambda: vllm_load(idle_stack) == (2, 0)), gateway_state(idle_stack)
        prefilled_tokens = vllm_gauge(idle_stack.vllm_url, "vllm:prompt_tokens_total")
        queued = open_raw_request(idle_stack.port, "/v1/chat/completions", {**CHAT, **LONG, "stream": True})
        # vLLM sends a stream's headers just before it adds the request to its engine: closing
        # earlier could cancel it inside that step, where vLLM sends no abort.
        assert read_headers(queued).startswith(b"HTTP/1.1 200"), gateway_state(idle_stack)
        assert gateway_in_flight(idle_stack) == 3, gateway_state(idle_stack)
        queued.close()
        assert wait_for(lambda: gateway_in_flight(idle_stack) == 2, 60), gateway_state(idle_stack)
        assert wait_for(lambda: vllm_handled(idle_stack) == handled + 1, 60), gateway_state(idle_stack)
        for sock in busy:
            sock.close()
        assert wait_for(lambda: gateway_in_flight(idle_stack) == 0, 60), gateway_state(idle_stack)
        assert wait_for(lambda: vllm_handled(idle_stack) == handled + 3, 60), gateway_state(idle_stack)
    assert_aborted(idle_stack, before)
    # Had it been scheduled instead of aborted, its prompt would have been prefilled.
    assert vllm_gauge(idle_stack.vllm_url, "vllm:prompt_tokens_total") == prefilled_tokens


def test_disconnect_from_a_non_streaming_request_aborts_it(idle_stack: Stack) -> None:
    before, handled = finish_counts(idle_stack), vllm_handled(idle_stack)
    # Frozen from the start and run in steps: while the engine runs, vLLM's API server can fall
    # behind it here (two cores), and its gauges with it. Closing as soon as the gateway counts
    # the request could cancel it before it was sent upstream, and vLLM would have nothing to abort.
    with idle_stack.engine_paused():
        sock = open_raw_request(idle_stack.port, "/v1/chat/completions", {**CHAT, **LONG})
        assert idle_stack.step_engine_until(lambda: vllm_load(idle_stack) == (1, 0)), gateway_state(idle_stack)
        assert gateway_in_flight(idle_stack) == 1, gateway_state(idle_stack)
        sock.close()
        assert wait_for(lambda: gateway_in_flight(idle_stack) == 0, 60), gateway_state(idle_stack)
        assert wait_for(lambda: vllm_handled(idle_stack) == handled + 1, 60), gateway_state(idle_stack)
    assert_aborted(idle_stack, before)


def test_upstream_client_error_keeps_its_status_and_openai_shape(stack: Stack) -> None:
    status, body = post_json(f"{stack.url}/v1/chat/completions", {**CHAT, "model": "no-such-model"})
    assert status == 404
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "no-such-model" in body["error"]["message"]


@pytest.mark.parametrize("payload", [b"{not json", b"[1, 2]", "\udcff".encode("utf-8", "surrogatepass")])
def test_malformed_body_is_a_400_not_forwarded(stack: Stack, payload: bytes) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    body = json.loads(response.read())
    assert response.status == 400
    assert body["error"]["type"] == "invalid_request_error"


def test_hop_by_hop_and_encoding_headers_are_not_relayed(stack: Stack) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=60)
    connection.request(
        "POST",
        "/v1/completions",
        json.dumps(COMPLETION),
        {"Content-Type": "application/json", "Accept-Encoding": "gzip", "Connection": "keep-alive"},
    )
    response = connection.getresponse()
    body = response.read()
    headers = [name.lower() for name, _ in response.getheaders()]
    assert response.status == 200
    assert "content-encoding" not in headers
    assert headers.count("server") <= 1 and headers.count("date") <= 1
    assert int(response.getheader("content-length")) == len(body)
    json.loads(body)


# --- an upstream that hangs -------------------------------------------------------------------


@pytest.fixture(scope="module")
def impatient_gateway(own_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second gateway in front of this module's vLLM, with stream timeouts of seconds."""
    gateway = start_stack(
        ["--upstream", own_stack.vllm_url, "--first-token-timeout-s", "3", "--inter-token-timeout-s", "2"],
        tmp_path_factory.mktemp("impatient") / "serve.log",
    )
    try:
        gateway.wait_ready(60)
        yield gateway
    finally:
        gateway.stop()


def read_stream_to_end(sock: socket.socket, received: bytes = b"") -> list[bytes]:
    """Every event's data until the connection closes or `[DONE]` arrives."""
    while b"data: [DONE]" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
    return [part.split(b"data: ", 1)[1] for part in received.split(b"\n\n") if b"data: " in part]


def test_no_first_token_in_time_ends_the_stream_and_aborts_upstream(
    idle_stack: Stack, impatient_gateway: Stack
) -> None:
    before, handled = finish_counts(idle_stack), vllm_handled(idle_stack)
    with idle_stack.engine_paused():
        sock = open_raw_request(impatient_gateway.port, "/v1/completions", {**COMPLETION, **LONG, "stream": True})
        events = read_stream_to_end(sock)
        assert wait_for(lambda: vllm_handled(idle_stack) == handled + 1, 60), gateway_state(impatient_gateway)
    sock.close()
    assert events[-1] == b"[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == 504 and "no first token" in error["message"], error
    assert_aborted(idle_stack, before)


def test_upstream_silent_between_tokens_ends_the_stream_and_aborts_upstream(
    idle_stack: Stack, impatient_gateway: Stack
) -> None:
    before, handled = finish_counts(idle_stack), vllm_handled(idle_stack)
    with idle_stack.engine_paused():
        sock = open_raw_request(impatient_gateway.port, "/v1/completions", {**COMPLETION, **LONG, "stream": True})
        assert read_headers(sock).startswith(b"HTTP/1.1 200")
        tally = EventTally(sock)
        assert idle_stack.step_engine_until(lambda: tally.at_least(3), step_s=0.5, timeout_s=1.0)
        events = read_stream_to_end(sock, tally.received)
        assert wait_for(lambda: vllm_handled(idle_stack) == handled + 1, 60), gateway_state(impatient_gateway)
    sock.close()
    assert events[-1] == b"[DONE]"
    assert len(events) > 3
    error = json.loads(events[-2])["error"]
    assert error["code"] == 504 and "sent nothing for" in error["message"], error
    assert_aborted(idle_stack, before)
    status, stats = http_get(f"{impatient_gateway.url}/stats")
    assert status == 200 and json.loads(stats)["requests"]["error"] >= 1
