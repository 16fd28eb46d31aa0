"""Write a stream's chunks straight to the client's socket, below ASGI.

A streamed answer is one small write per token. Through ASGI each of them is a message dict
passed down Starlette's and the middlewares' send wrappers to uvicorn's `send`, which frames it
as an HTTP chunk and writes it: about a third of the gateway's CPU per event on a 2-core box,
where that CPU is taken from vLLM. The response headers and the closing chunk still go through
ASGI (so every middleware sees the response start and end as usual); only the body chunks in
between are framed here and written to the transport uvicorn's httptools protocol writes to.

Anything else (another server, h11, HTTP/1.0 without chunked framing, a test client) gets no
writer, and the caller sends through ASGI as before.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

# The server's own `send`, before any wrapper, kept in the scope by `GatewayApp`.
SERVER_SEND = "student.server_send"
_HTTPTOOLS_CYCLE = "uvicorn.protocols.http.httptools_impl"


class GatewayApp(FastAPI):
    """FastAPI that keeps the server's own `send` in each HTTP scope for `ChunkWriter`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)


class ChunkWriter:
    """Chunked-encoding writes on the client's transport for one response already started."""

    __slots__ = ("_cycle", "_flow", "_transport")

    def __init__(self, cycle: Any):
        self._cycle = cycle
        self._transport = cycle.transport
        self._flow = cycle.flow

    @classmethod
    def for_scope(cls, scope: Scope) -> ChunkWriter | None:
        """A writer when the response (already started) is chunked on uvicorn's httptools protocol."""
        cycle = getattr(scope.get(SERVER_SEND), "__self__", None)
        if cycle is None or type(cycle).__module__ != _HTTPTOOLS_CYCLE:
            return None
        if not cycle.response_started or cycle.response_complete or cycle.chunked_encoding is not True:
            return None
        return cls(cycle)

    def write(self, data: bytes) -> bool:
        """Send `data` as one HTTP chunk; False (nothing written) once the client is gone.

        Empty `data` writes nothing: a zero-length chunk is HTTP's end of the body.
        """
        if self._cycle.disconnected:
            return False
        if not data:
            return True
        self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    @property
    def paused(self) -> bool:
        """The client reads slower than we write: wait on `drain()` before writing more."""
        return self._flow.write_paused

    async def drain(self) -> None:
        await self._flow.drain()
