"""Stream chunks written straight to the client's socket: framing, back-pressure, disconnects.

A real uvicorn (uvloop + httptools, as `student serve` runs it) serves a `GatewayApp` whose
route streams through `RelayResponse`; clients are raw sockets, so the HTTP framing on the wire
is what is checked, not what a client library makes of it.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from server.gateway.client_socket import ChunkWriter, GatewayApp
from server.gateway.proxy import RelayResponse
from tests.support import free_port, uvicorn_in_thread, wait_for

BIG_CHUNK = b"x" * 65_536


@dataclass
class Served:
    """What the streaming route saw: writers it got, chunks its body produced, how it ended."""

    writers: list[ChunkWriter | None] = field(default_factory=list)
    produced: int = 0
    closed: threading.Event = field(default_factory=threading.Event)
    paused_seen: bool = False


def streaming_app(served: Served) -> GatewayApp:
    app = GatewayApp()

    async def body(count: int, chunk: bytes, delay_s: float, gaps: bool) -> AsyncIterator[bytes]:
        for index in range(count):
            served.produced += 1
            yield chunk if chunk else b"data: %d\n\n" % index
            if gaps:
                yield b""
            if delay_s:
                await asyncio.sleep(delay_s)

    @app.get("/stream")
    async def stream(
        request: Request, count: int = 5, big: bool = False, delay_s: float = 0.0, gaps: bool = False
    ) -> RelayResponse:
        chunks = body(count, BIG_CHUNK if big else b"", delay_s, gaps)
        return ObservedRelay(chunks, served=served, media_type="text/event-stream", on_close=served.closed.set)

    return app


class ObservedRelay(RelayResponse):
    """RelayResponse that also notes the writer it got and whether the client pushed back."""

    def __init__(self, *args, served: Served, **kwargs):
        super().__init__(*args, **kwargs)
        self._served = served

    async def stream_response(self, send) -> None:
        async def noting_send(message):
            await send(message)
            if message["type"] == "http.response.start":
                writer = ChunkWriter.for_scope(self._scope)
                self._served.writers.append(writer)
                if writer is not None:
                    self._watch(writer)

        await super().stream_response(noting_send)

    def _watch(self, writer: ChunkWriter) -> None:
        def poll() -> None:
            if writer.paused:
                self._served.paused_seen = True
            if not self._served.closed.is_set():
                loop.call_later(0.001, poll)

        loop = asyncio.get_running_loop()
        poll()


@pytest.fixture
def server() -> Iterator[tuple[int, Served]]:
    """uvicorn with uvloop + httptools on a free port, in a thread; stopped afterwards."""
    served = Served()
    port = free_port()
    with uvicorn_in_thread(streaming_app(served), port, loop="uvloop", http="httptools"):
        yield port, served


def raw_get(port: int, path: str) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", port))
    client.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
    return client


def read_response(client: socket.socket) -> tuple[bytes, list[bytes]]:
    """(head, chunks) of one chunked response, decoded by hand from the raw bytes."""
    data = b""
    while b"0\r\n\r\n" not in data or not data.endswith(b"0\r\n\r\n"):
        more = client.recv(1 << 20)
        if not more:
            break
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    chunks = []
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", "nothing may follow the last chunk"
            return head, chunks
        chunks.append(rest[:size])
        assert rest[size : size + 2] == b"\r\n"
        rest = rest[size + 2 :]


def test_chunks_go_straight_to_the_socket_framed_one_per_event(server: tuple[int, Served]) -> None:
    port, served = server
    with raw_get(port, "/stream?count=5") as client:
        head, chunks = read_response(client)
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding: chunked" in head.lower()
    assert chunks == [b"data: %d\n\n" % index for index in range(5)]
    assert served.writers and served.writers[0] is not None, "uvicorn's httptools protocol gets the direct writer"


def test_keep_alive_connection_serves_the_next_request_after_a_direct_stream(server: tuple[int, Served]) -> None:
    port, _ = server
    with raw_get(port, "/stream?count=3") as client:
        first = read_response(client)[1]
        client.sendall(b"GET /stream?count=2 HTTP/1.1\r\nHost: test\r\n\r\n")
        second = read_response(client)[1]
    assert (first, second) == ([b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"], [b"data: 0\n\n", b"data: 1\n\n"])


def test_a_slow_reader_pauses_the_writer_and_loses_nothing(server: tuple[int, Served]) -> None:
    port, served = server
    count = 512  # 32 MiB: far past the transport's high-water mark and what the kernel buffers
    with raw_get(port, f"/stream?count={count}&big=true") as client:
        assert wait_for(lambda: served.paused_seen, 30), "the writer never saw back-pressure"
        time.sleep(0.5)
        assert served.produced < count, "the relay ran ahead of a client that was not reading"
        _, chunks = read_response(client)
    assert len(chunks) == count and all(chunk == BIG_CHUNK for chunk in chunks)


def test_a_client_that_leaves_ends_the_stream(server: tuple[int, Served]) -> None:
    port, served = server
    client = raw_get(port, "/stream?count=100000&delay_s=0.001")
    assert wait_for(lambda: served.produced > 10, 30)
    client.close()
    assert served.closed.wait(30), "the stream was not closed after the client left"
    produced = served.produced
    time.sleep(0.1)
    assert served.produced == produced < 100000


def test_without_uvicorn_the_stream_goes_through_asgi(server: tuple[int, Served]) -> None:
    _, served = server
    app = streaming_app(served)
    with TestClient(app) as client:
        response = client.get("/stream?count=3")
    assert response.status_code == 200
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert served.writers[-1] is None


def test_an_empty_chunk_from_the_body_does_not_end_the_stream(server: tuple[int, Served]) -> None:
    """A zero-length HTTP chunk ends the body: `write(b"")` used to send one mid-stream."""
    port, served = server
    client = raw_get(port, "/stream?count=3&gaps=true")
    _, chunks = read_response(client)
    client.close()
    assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert served.writers and served.writers[0] is not None
