"""Forward OpenAI-compatible requests to vLLM and relay the answers, streaming or not.

Two duties beyond copying bytes: a client that goes away must close its upstream request (so
vLLM aborts it and frees the slot), and every upstream failure must reach the client as an
OpenAI-shaped error. The gateway runs on the same small box as vLLM, so per-event work is kept
to a split on the SSE separator.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import error_body, error_response, normalize_upstream_error
from server.settings import Settings
from server.recorder import RequestRecorder
from server.sse import EventSplitter
from server.telemetry import RequestRecord, StreamObserver, request_usage_in_stream, take_usage_from_body

T = TypeVar("T")

# Hop-by-hop headers (RFC 9110 §7.6.1) plus those the gateway recomputes itself.
_DROP_REQUEST_HEADERS = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
        "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding",
    }
)
_DROP_RESPONSE_HEADERS = _DROP_REQUEST_HEADERS | {"content-encoding", "date", "server"}

CLIENT_CLOSED_REQUEST = 499
_DONE = b"data: [DONE]"


class ClientDisconnected(Exception):
    """The downstream client went away before the answer was complete."""


def create_upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """One pooled client for all upstream traffic, sized for hundreds of concurrent streams."""
    connector = aiohttp.TCPConnector(
        limit=settings.upstream_max_connections,
        limit_per_host=0,
        keepalive_timeout=60,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.upstream_connect_timeout_s,
        sock_read=settings.upstream_read_timeout_s,
    )
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)


def forwardable_headers(headers: Mapping[str, str], drop: frozenset[str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() not in drop}


class UpstreamProxy:
    """The request path from the gateway to one vLLM server."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        ready_timeout_s: float = 2.0,
        recorder: RequestRecorder | None = None,
        stream_timeouts: StreamTimeouts | None = None,
    ):
        self._session = session
        self.base_url = base_url
        self._ready_timeout = aiohttp.ClientTimeout(total=ready_timeout_s)
        self._recorder = recorder
        self._stream_timeouts = stream_timeouts or StreamTimeouts()
        # Streams are watched by one timer each (StreamWatch), not by a timer re-armed per read.
        self._stream_client_timeout = aiohttp.ClientTimeout(
            total=None, connect=session.timeout.connect, sock_connect=session.timeout.sock_connect
        )

    def reject(self, path: str, payload: dict[str, Any] | None, response: Response) -> Response:
        """Account for a request the gateway itself refused (bad input): it is in the ledger too."""
        record = _new_record(path, "gateway", payload)
        if self._recorder is not None:
            self._recorder.begin(record)
        return self._finish(record, response)

    async def forward(self, request: Request, path: str, body: bytes, payload: dict[str, Any]) -> Response:
        """POST `body` (already parsed as `payload`) to `path` upstream; relay the stream or the answer."""
        record = _new_record(path, self.base_url, payload)
        record.key_name = request.scope.get("state", {}).get("api_key_name")
        recorder = self._recorder
        observer = None
        if recorder is not None and record.stream:
            rewritten, wish = request_usage_in_stream(payload, continuous=recorder.measures_energy)
            body = rewritten or body
            observer = StreamObserver(record, wish, recorder.token_sink(record))
        headers = forwardable_headers(request.headers, _DROP_REQUEST_HEADERS)
        headers["accept-encoding"] = "identity"
        headers["content-type"] = "application/json"
        if recorder is not None:
            recorder.begin(record)
        if record.stream:
            sending = self._session.post(
                self.base_url + path, data=body, headers=headers, timeout=self._stream_client_timeout
            )
            wait_s = self._stream_timeouts.first_token_s
        else:
            sending = self._session.post(self.base_url + path, data=body, headers=headers)
            wait_s = None
        try:
            upstream = await _unless_disconnected(request, sending, wait_s)
        except ClientDisconnected:
            return self._finish(record, Response(status_code=CLIENT_CLOSED_REQUEST))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self._finish(record, upstream_failure(exc))
        except BaseException:
            self._finished(record, CLIENT_CLOSED_REQUEST)
            raise
        if upstream.status >= 400 or not record.stream:
            return await self._whole_answer(request, upstream, record)
        return RelayResponse(
            self._relay(upstream, record, observer),
            status_code=upstream.status,
            headers=forwardable_headers(upstream.headers, _DROP_RESPONSE_HEADERS),
            on_close=lambda: self._abandon(upstream, record),
        )

    async def get(self, path: str) -> Response:
        """Forward a bodiless GET (e.g. /v1/models)."""
        try:
            async with self._session.get(self.base_url + path) as upstream:
                content = await upstream.read()
                return self._answer(upstream, content)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return upstream_failure(exc)

    async def check_ready(self) -> str | None:
        """None when the upstream answers its /health, else the reason it does not."""
        try:
            async with self._session.get(self.base_url + "/health", timeout=self._ready_timeout) as resp:
                if resp.status == 200:
                    return None
                return f"upstream /health answered HTTP {resp.status}"
        except aiohttp.ClientError as exc:
            return f"upstream {self.base_url} unreachable: {exc}"
        except asyncio.TimeoutError:
            return f"upstream {self.base_url} did not answer /health in time"

    async def vllm_load(self) -> dict[str, Any]:
        """vLLM's running and waiting requests and KV-cache use (0..1), from its /metrics."""
        load: dict[str, Any] = {"url": self.base_url, "running": None, "waiting": None, "kv_cache_usage": None}
        try:
            async with self._session.get(self.base_url + "/metrics", timeout=self._ready_timeout) as resp:
                if resp.status != 200:
                    return {**load, "error": f"upstream /metrics answered HTTP {resp.status}"}
                text = await resp.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return {**load, "error": f"upstream /metrics unreachable: {exc!r}"}
        return {**load, **vllm_gauges(text), "error": None}

    async def _whole_answer(
        self, request: Request, upstream: aiohttp.ClientResponse, record: RequestRecord
    ) -> Response:
        try:
            content = await _unless_disconnected(request, upstream.read())
        except ClientDisconnected:
            return self._finish(record, Response(status_code=CLIENT_CLOSED_REQUEST))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return self._finish(record, upstream_failure(exc))
        except BaseException:
            self._finished(record, CLIENT_CLOSED_REQUEST)
            raise
        finally:
            # Closing an unfinished answer drops the connection, which makes vLLM abort it.
            upstream.close()
        if upstream.status < 400:
            take_usage_from_body(record, content)
        return self._finish(record, self._answer(upstream, content))

    def _finish(self, record: RequestRecord, response: Response) -> Response:
        self._finished(record, response.status_code)
        return response

    def _finished(self, record: RequestRecord, status: int) -> None:
        """Close the record once (later calls do nothing) and hand it to the recorder."""
        if record.status is not None:
            return
        record.finished_s = time.monotonic()
        record.status = status
        if self._recorder is not None:
            self._recorder.finish(record)

    def _abandon(self, upstream: aiohttp.ClientResponse, record: RequestRecord) -> None:
        """After a relay ends, however it ended: no open upstream answer, no unfinished record."""
        upstream.close()
        self._finished(record, CLIENT_CLOSED_REQUEST)

    @staticmethod
    def _answer(upstream: aiohttp.ClientResponse, content: bytes) -> Response:
        if upstream.status >= 400:
            return JSONResponse(normalize_upstream_error(upstream.status, content), upstream.status)
        return Response(
            content,
            upstream.status,
            headers=forwardable_headers(upstream.headers, _DROP_RESPONSE_HEADERS),
        )

    async def _relay(
        self, upstream: aiohttp.ClientResponse, record: RequestRecord, observer: StreamObserver | None
    ) -> AsyncIterator[bytes]:
        """Yield the whole SSE events each upstream read completes; on failure end with an error event.

        Events that arrived in one read go out in one write (nothing is held back for later, so
        inter-token timing is kept; it saves a system call per event when vLLM falls behind and
        sends bursts). The record is closed before `data: [DONE]` goes out, so its ledger row is
        committed before the client can see the answer finished.
        """
        splitter = EventSplitter()
        feed = splitter.feed
        read = upstream.content.readany  # the loop below runs per event: no iterator wrappers
        keep = None if observer is None else observer.keep
        status = CLIENT_CLOSED_REQUEST
        watch = StreamWatch(upstream.content, record.started_s, self._stream_timeouts)
        clock = time.monotonic
        try:
            while chunk := await read():
                watch.last_s = clock()
                out = b""
                for event in feed(chunk):
                    if keep is not None and (event := keep(event)) is None:
                        continue
                    if event.startswith(_DONE):
                        self._finished(record, upstream.status)
                    out = out + event if out else event
                if out:
                    yield out
            rest = splitter.flush()
            if rest:
                yield rest
            status = upstream.status
        except UpstreamSilent as exc:
            status = 504
            yield _error_event(status, str(exc))
            self._finished(record, status)
            yield _DONE + b"\n\n"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = 502
            yield _error_event(502, f"upstream stream broke off: {exc!r}")
            self._finished(record, status)
            yield _DONE + b"\n\n"
        finally:
            watch.cancel()
            # Unread data means the client left early (or the upstream went silent): closing the
            # socket makes vLLM abort the request and free its slot.
            upstream.close()
            self._finished(record, status)


@dataclass(frozen=True)
class StreamTimeouts:
    """How long a stream may wait for its first event, and then between events (seconds)."""

    first_token_s: float = 120.0
    inter_token_s: float = 30.0


class UpstreamSilent(asyncio.TimeoutError):
    """The upstream sent nothing for longer than a stream timeout allows."""


class StreamWatch:
    """Ends a stream whose upstream went silent, with one timer per stream.

    A timeout re-armed on every read costs a timer-heap operation per event; here the relay
    only stores the time of each read and the timer, when it fires, either re-arms itself from
    that time or fails the upstream reader, which wakes the relay with `UpstreamSilent`.
    """

    __slots__ = ("last_s", "_content", "_timeouts", "_handle")

    def __init__(self, content: aiohttp.StreamReader, started_s: float, timeouts: StreamTimeouts):
        self.last_s: float | None = None
        self._content = content
        self._timeouts = timeouts
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(started_s + timeouts.first_token_s - time.monotonic(), self._check)

    def _check(self) -> None:
        now_s = time.monotonic()
        if self.last_s is None:
            limit_s = self._timeouts.first_token_s
            self._content.set_exception(UpstreamSilent(f"no first token from the upstream in {limit_s:g} s"))
            return
        silent_s = now_s - self.last_s
        limit_s = self._timeouts.inter_token_s
        if silent_s >= limit_s:
            self._content.set_exception(UpstreamSilent(f"the upstream sent nothing for {silent_s:.1f} s (limit {limit_s:g} s)"))
            return
        self._handle = asyncio.get_running_loop().call_later(limit_s - silent_s, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class RelayResponse(StreamingResponse):
    """A stream that is cancelled the moment the client disconnects, even between events.

    Starlette only watches for disconnects itself under ASGI spec < 2.4 and otherwise notices on
    the next write, which could be minutes away while a request waits for its first token.
    """

    def __init__(self, *args: Any, on_close: Callable[[], None], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, watch):
                task.cancel()
            await asyncio.gather(relay, watch, return_exceptions=True)
            # A relay cancelled before its first event never ran its own `finally`.
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_close()
        if relay.done() and not relay.cancelled() and relay.exception() is not None:
            raise relay.exception()  # type: ignore[misc]


_VLLM_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


def vllm_gauges(metrics_text: str) -> dict[str, float | None]:
    """Sum each gauge of `_VLLM_GAUGES` over its label sets (engines); None when absent."""
    found: dict[str, float | None] = dict.fromkeys(_VLLM_GAUGES.values())
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = _VLLM_GAUGES.get(name)
        if key is not None:
            found[key] = (found[key] or 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def _new_record(path: str, upstream: str, payload: dict[str, Any] | None) -> RequestRecord:
    payload = payload or {}
    model = payload.get("model")
    return RequestRecord(path, upstream, payload.get("stream") is True, model if isinstance(model, str) else None)


def upstream_failure(exc: BaseException) -> Response:
    """504 on a timeout, 503 when nothing listens upstream, 502 when it broke mid-answer."""
    if isinstance(exc, UpstreamSilent):
        return error_response(504, str(exc))
    if isinstance(exc, asyncio.TimeoutError):
        return error_response(504, "upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError):
        return error_response(503, f"upstream unavailable: {exc}", headers={"Retry-After": "5"})
    return error_response(502, f"upstream error: {exc!r}")


def _error_event(status: int, message: str) -> bytes:
    return b"data: " + json.dumps(error_body(status, message)).encode() + b"\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T], timeout_s: float | None = None) -> T:
    """Await `awaitable` unless the client disconnects first or `timeout_s` passes (then cancel
    it and raise ClientDisconnected or UpstreamSilent)."""
    work: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait({work, watch}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    if watch.done() and not watch.cancelled():
        raise ClientDisconnected
    raise UpstreamSilent(f"the upstream did not start answering in {timeout_s:g} s")
