"""Upstream faults the real vLLM will not produce on demand, from a scripted HTTP peer."""

from __future__ import annotations

import http.client
import json
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from server.gateway.proxy import vllm_gauges
from tests.support import Stack, http_get, start_stack, wait_for

EVENTS = [f'data: {{"choices": [{{"index": 0, "text": "{word}"}}]}}\n\n'.encode() for word in ("xin", " chào")]


class BreaksMidStream(socketserver.BaseRequestHandler):
    """Answers 200 text/event-stream, sends two events, then drops the connection."""

    def handle(self) -> None:
        self.request.recv(65536)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in EVENTS)
        self.request.sendall(head + body)
        time.sleep(0.5)  # the events are delivered; then the "engine" dies
        self.request.close()


class ResetsBeforeAnswering(socketserver.BaseRequestHandler):
    """Healthy to GETs (/health); a POST is read, then the connection reset (RST) without a byte
    of answer: a vLLM dying under a request."""

    def handle(self) -> None:
        if self.request.recv(65536).startswith(b"GET"):
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.request.close()
            return
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.request.close()


class FloodsThenFinishes(socketserver.BaseRequestHandler):
    """Healthy to GETs; a POST gets FLOOD_EVENTS big events as fast as the socket takes them
    (32 MiB: far more than the socket buffers hold), then `data: [DONE]`."""

    def handle(self) -> None:
        if self.request.recv(65536).startswith(b"GET"):
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            self.request.close()
            return
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for event in [FLOOD_EVENT] * FLOOD_EVENTS + [b"data: [DONE]\n\n"]:
            self.request.sendall(b"%x\r\n%s\r\n" % (len(event), event))
        self.request.sendall(b"0\r\n\r\n")
        self.request.close()


FLOOD_EVENT = b'data: {"choices": [{"index": 0, "text": "' + b"x" * 65_536 + b'"}]}\n\n'
FLOOD_EVENTS = 512


@contextmanager
def gateway_in_front_of(handler: type[socketserver.BaseRequestHandler], log_dir, *args: str) -> Iterator[Stack]:
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    gateway = start_stack(["--upstream", f"http://127.0.0.1:{upstream.server_address[1]}", *args], log_dir / "log")
    try:
        assert wait_for(lambda: _up(gateway), 60), gateway.log()
        yield gateway
    finally:
        gateway.stop()
        upstream.shutdown()
        upstream.server_close()


@pytest.fixture(scope="module")
def gateway_to_broken_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with gateway_in_front_of(BreaksMidStream, tmp_path_factory.mktemp("faults")) as gateway:
        yield gateway


def _up(gateway: Stack) -> bool:
    try:
        return http_get(f"{gateway.url}/health", timeout_s=1)[0] == 200
    except OSError:
        return False


def test_stream_broken_upstream_ends_with_error_event_and_done(gateway_to_broken_upstream: Stack) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", gateway_to_broken_upstream.port, timeout=30)
    body = json.dumps({"model": "student", "prompt": "x", "stream": True})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    events = [event + b"\n\n" for event in response.read().split(b"\n\n") if event]
    assert response.status == 200
    assert events[:2] == EVENTS
    error = json.loads(events[2].removeprefix(b"data: "))["error"]
    assert error["code"] == 502 and "broke off" in error["message"]
    assert events[3:] == [b"data: [DONE]\n\n"]


@pytest.mark.e2e
@pytest.mark.parametrize("stream", [False, True])
def test_connection_reset_before_any_answer_is_503_with_retry_after(tmp_path, stream: bool) -> None:
    with gateway_in_front_of(ResetsBeforeAnswering, tmp_path) as gateway:
        connection = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
        body = json.dumps({"model": "student", "prompt": "x", "stream": stream})
        connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        error = json.loads(response.read())["error"]
    assert response.status == 503, error
    assert response.getheader("Retry-After") == "5"
    assert error["code"] == 503 and "unavailable" in error["message"]
    assert "no healthy replica" not in error["message"]  # the reset itself, not a failed health check


@pytest.mark.e2e
def test_a_client_reading_slowly_is_not_taken_for_a_silent_upstream(tmp_path) -> None:
    """While the client does not read, the gateway stops reading upstream (back-pressure); that
    pause is the client's, so it must not trip the stream timeouts (1 s here)."""
    timeouts = ("--first-token-timeout-s", "1", "--inter-token-timeout-s", "1")
    with gateway_in_front_of(FloodsThenFinishes, tmp_path, *timeouts) as gateway:
        body = json.dumps({"model": "student", "prompt": "a", "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=60) as client:
            client.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            received = client.recv(65536)
            time.sleep(3)  # not reading: buffers fill, the gateway's relay waits for this client
            while not received.endswith(b"0\r\n\r\n"):
                more = client.recv(1 << 20)
                assert more, "the gateway closed the stream early"
                received += more
    assert b'"error"' not in received, received[-600:]
    assert received.count(b"x" * 65_536) == FLOOD_EVENTS and b"data: [DONE]" in received


def test_vllm_gauges_add_requests_over_engines_and_take_the_fullest_kv_cache() -> None:
    """Two engines at 80 % KV cache are 80 % (summing them read 160 %)."""
    text = "\n".join(
        [
            "# TYPE vllm:num_requests_running gauge",
            'vllm:num_requests_running{engine="0",model_name="student"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="student"} 2.0',
            'vllm:num_requests_waiting{engine="0",model_name="student"} 1.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="student"} 0.8',
            'vllm:kv_cache_usage_perc{engine="1",model_name="student"} 0.75',
        ]
    )
    assert vllm_gauges(text) == {"running": 5.0, "waiting": 1.0, "kv_cache_usage": 0.8}
    assert vllm_gauges("") == {"running": None, "waiting": None, "kv_cache_usage": None}
