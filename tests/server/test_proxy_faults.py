"""Upstream faults the real vLLM will not produce on demand, from a scripted HTTP peer."""

from __future__ import annotations

import http.client
import json
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

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


@pytest.fixture(scope="module")
def gateway_to_broken_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), BreaksMidStream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{upstream.server_address[1]}"
    gateway = start_stack(["--upstream", url], tmp_path_factory.mktemp("faults") / "log")
    try:
        assert wait_for(lambda: _up(gateway), 60), gateway.log()
        yield gateway
    finally:
        gateway.stop()
        upstream.shutdown()
        upstream.server_close()


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
