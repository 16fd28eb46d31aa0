"""Forward OpenAI-compatible requests to vLLM and relay the answers, streaming or not.

Two duties beyond copying bytes: a client that goes away must close its upstream request (so
vLLM aborts it and frees the slot), and every upstream failure must reach the client as an
OpenAI-shaped error. The gateway runs on the same small box as vLLM, so per-event work is kept
to a split on the SSE separator.
"""

from __future__ import annotations

import asyncio
import json
import operator
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import aiohttp
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.control.balancer import Balancer, NoHealthyReplicaError, Replica
from server.control.hybrid_routing import SCOPE_KEY as ROUTE_SCOPE_KEY
from server.gateway.client_socket import ChunkWriter
from server.gateway.errors import error_body, error_response, normalize_upstream_error
from server.gateway.sse import EventSplitter
from server.runtime.settings import Settings
from server.telemetry.recorder import RequestRecorder
from server.telemetry.request_record import RequestRecord, StreamObserver, request_usage_in_stream, take_usage_from_body
from server.telemetry.stream_trace import StreamTiming, StreamTrace

T = TypeVar("T")

# Hop-by-hop headers (RFC 9110 §7.6.1) plus those the gateway recomputes itself.
_DROP_REQUEST_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)
_DROP_RESPONSE_HEADERS = _DROP_REQUEST_HEADERS | {"content-encoding", "date", "server"}

CLIENT_CLOSED_REQUEST = 499
_DONE = b"data: [DONE]"


class ClientDisconnectedError(Exception):
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
    """The request path from the gateway to its vLLM replicas (`balancer` picks one per request)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        balancer: Balancer,
        ready_timeout_s: float = 2.0,
        recorder: RequestRecorder | None = None,
        stream_timeouts: StreamTimeouts | None = None,
        target: UpstreamTarget | None = None,
        trace: StreamTrace | None = None,
    ):
        self._session = session
        self._trace = trace
        self.balancer = balancer
        self.target = target or UpstreamTarget()
        self._drop_request_headers = _DROP_REQUEST_HEADERS | self.target.drop_headers
        self.base_url = ", ".join(balancer.urls)  # for people (/ready, /stats): one URL per replica
        self._ready_timeout = aiohttp.ClientTimeout(total=ready_timeout_s)
        self._recorder = recorder
        self._stream_timeouts = stream_timeouts or StreamTimeouts()
        # Streams are watched by one timer each (StreamWatch), not by a timer re-armed per read.
        self._stream_client_timeout = aiohttp.ClientTimeout(
            total=None, connect=session.timeout.connect, sock_connect=session.timeout.sock_connect
        )

    def reject(
        self, path: str, payload: dict[str, Any] | None, response: Response, request: Request | None = None
    ) -> Response:
        """Account for a request the gateway itself refused (bad input): it is in the ledger too."""
        record = _new_record(path, "gateway", payload)
        record.routed_to = self.target.route
        decision = None if request is None else request.scope.get("state", {}).get(ROUTE_SCOPE_KEY)
        record.route_reason = None if decision is None else decision.reason
        if self._recorder is not None:
            self._recorder.begin(record)
        return self._finish(record, response)

    async def forward(self, request: Request, path: str, body: bytes, payload: dict[str, Any]) -> Response:
        """POST `body` (already parsed as `payload`) to `path` on a replica; relay the stream or the answer.

        When the connection to a replica fails before any answer (refused, or reset: a replica
        that just died), another replica gets the request: answers have no side effects, and a
        replica that lost the connection has aborted whatever it had started.
        """
        target = self.target
        if target.model is not None and payload.get("model") != target.model:
            payload = {**payload, "model": target.model}
            body = json.dumps(payload, ensure_ascii=False).encode()
        record = _new_record(path, "gateway", payload)
        state = request.scope.get("state", {})
        record.key_name = state.get("api_key_name")
        record.routed_to = target.route
        decision = state.get(ROUTE_SCOPE_KEY)
        record.route_reason = None if decision is None else decision.reason
        recorder = self._recorder
        observer = None
        if recorder is not None and record.stream:
            sink = recorder.token_sink(record)  # None unless the meter attributes energy to it
            rewritten, wish = request_usage_in_stream(payload, continuous=sink is not None)
            body = rewritten or body
            observer = StreamObserver(record, wish, sink)
        headers = forwardable_headers(request.headers, self._drop_request_headers)
        headers.update(target.headers)
        headers["accept-encoding"] = "identity"
        headers["content-type"] = "application/json"
        if recorder is not None:
            recorder.begin(record)
        try:
            replica = self.balancer.pick()
        except NoHealthyReplicaError as exc:
            return self._finish(record, no_healthy_replica(exc))
        record.upstream = replica.base_url  # from here on, `_finished` releases the replica
        tried: list[Replica] = []
        timing = StreamTiming(record.started_s) if self._trace is not None and record.stream else None
        while True:
            if timing is not None:
                timing.sent_s = time.monotonic()
            if record.stream:
                sending = self._session.post(
                    replica.base_url + path, data=body, headers=headers, timeout=self._stream_client_timeout
                )
                wait_s = self._stream_timeouts.first_token_s
            else:
                sending = self._session.post(replica.base_url + path, data=body, headers=headers)
                wait_s = None
            try:
                upstream = await _unless_disconnected(request, sending, wait_s)
                if timing is not None:
                    timing.headers_s = time.monotonic()
                break
            except ClientDisconnectedError:
                return self._finish(record, Response(status_code=CLIENT_CLOSED_REQUEST))
            except asyncio.TimeoutError as exc:  # (aiohttp's timeouts too) the replica may be at work
                return self._finish(record, upstream_failure(exc))
            except aiohttp.ClientError as exc:
                tried.append(replica)
                try:
                    other = self.balancer.pick(exclude=tried)
                except NoHealthyReplicaError:
                    return self._finish(record, upstream_failure(exc, before_answer=True))
                refused = isinstance(exc, aiohttp.ClientConnectorError)
                self.balancer.release(replica, upstream_failure(exc, before_answer=True).status_code, refused=refused)
                replica = other
                record.upstream = replica.base_url
            except BaseException:
                self._finished(record, CLIENT_CLOSED_REQUEST)
                raise
        if upstream.status >= 400 or not record.stream:
            return await self._whole_answer(request, upstream, record)
        return RelayResponse(
            self._relay(upstream, record, observer, timing),
            status_code=upstream.status,
            headers=forwardable_headers(upstream.headers, _DROP_RESPONSE_HEADERS),
            on_close=lambda: self._abandon(upstream, record),
        )

    async def get(self, path: str) -> Response:
        """Forward a bodiless GET (e.g. /v1/models) to a healthy replica."""
        try:
            replica = self.balancer.pick()
        except NoHealthyReplicaError as exc:
            return no_healthy_replica(exc)
        response: Response | None = None
        try:
            async with self._session.get(replica.base_url + path) as upstream:
                content = await upstream.read()
                response = self._answer(upstream, content)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            response = upstream_failure(exc)
        finally:
            self.balancer.release(replica, CLIENT_CLOSED_REQUEST if response is None else response.status_code)
        return response

    async def check_ready(self) -> str | None:
        """Check every replica's /health now; None when one answers, else why none does."""
        return await self.balancer.check_ready()

    async def vllm_load(self) -> dict[str, Any]:
        """vLLM's running and waiting requests and KV-cache use (0..1), from each replica's /metrics.

        The top level is all replicas together (requests summed, KV cache the fullest replica's;
        `error` names those that did not answer); `replicas` has each one's own figures.
        """
        loads = await asyncio.gather(*(self._replica_load(url) for url in self.balancer.urls))
        if len(loads) == 1:
            return {**loads[0], "replicas": loads}
        answered = [load for load in loads if load["error"] is None]
        errors = [f"{load['url']}: {load['error']}" for load in loads if load["error"] is not None]
        combined: dict[str, Any] = {"url": self.base_url}
        for key, merge in (("running", sum), ("waiting", sum), ("kv_cache_usage", max)):
            values = [load[key] for load in answered if load[key] is not None]
            combined[key] = merge(values) if values else None
        return {**combined, "error": "; ".join(errors) or None, "replicas": loads}

    async def _replica_load(self, base_url: str) -> dict[str, Any]:
        load: dict[str, Any] = {"url": base_url, "running": None, "waiting": None, "kv_cache_usage": None}
        try:
            async with self._session.get(base_url + "/metrics", timeout=self._ready_timeout) as resp:
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
        except ClientDisconnectedError:
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
        replica = self.balancer.replica(record.upstream)  # None when the gateway refused it
        if replica is not None:
            self.balancer.release(replica, status)
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
        self,
        upstream: aiohttp.ClientResponse,
        record: RequestRecord,
        observer: StreamObserver | None,
        timing: StreamTiming | None = None,
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
                read_s = watch.last_s = clock()
                out = b""
                for event in feed(chunk):
                    if keep is not None:
                        kept = keep(event)
                        if kept is None:
                            continue
                        event = kept
                    if event.startswith(_DONE):
                        self._finished(record, upstream.status)
                    out = out + event if out else event
                if out:
                    watch.sending = True
                    yield out
                    watch.sending = False
                    watch.last_s = clock()
                if timing is not None:
                    timing.read(read_s, len(chunk), out.count(b"\n\n"))
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
            if timing is not None and self._trace is not None:
                self._trace.write(timing, record.request_id, record.status)


@dataclass(frozen=True)
class UpstreamTarget:
    """Who an UpstreamProxy talks to: the local student (the default) or the remote API.

    `model` replaces the request's `model`; `headers` (e.g. the remote's Authorization) replace
    the client's; `drop_headers` (lower case) are not forwarded (e.g. the gateway's own key).
    """

    route: str = "local"
    model: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    drop_headers: frozenset[str] = frozenset()


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
    While the relay is `sending` (waiting for a slow client to take the last events) it does
    not read upstream, so that time is not the upstream's silence.
    """

    __slots__ = ("_content", "_handle", "_timeouts", "last_s", "sending")

    def __init__(self, content: aiohttp.StreamReader, started_s: float, timeouts: StreamTimeouts):
        self.last_s: float | None = None
        self.sending = False
        self._content = content
        self._timeouts = timeouts
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(started_s + timeouts.first_token_s - time.monotonic(), self._check)

    def _check(self) -> None:
        if self.sending:
            self._handle = asyncio.get_running_loop().call_later(self._timeouts.inter_token_s, self._check)
            return
        now_s = time.monotonic()
        if self.last_s is None:
            limit_s = self._timeouts.first_token_s
            self._content.set_exception(UpstreamSilent(f"no first token from the upstream in {limit_s:g} s"))
            return
        silent_s = now_s - self.last_s
        limit_s = self._timeouts.inter_token_s
        if silent_s >= limit_s:
            self._content.set_exception(
                UpstreamSilent(f"the upstream sent nothing for {silent_s:.1f} s (limit {limit_s:g} s)")
            )
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
        self._scope: Scope = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope = scope
        relay = asyncio.ensure_future(self.stream_response(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (relay, watch):
                task.cancel()
            await asyncio.gather(relay, watch, return_exceptions=True)
            # A relay cancelled before its first event never ran its own `finally`.
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # ours is a generator
            self._on_close()
        error = relay.exception() if relay.done() and not relay.cancelled() else None
        if error is not None:
            raise error

    async def stream_response(self, send: Send) -> None:
        """Headers and the closing chunk through ASGI; the chunks between straight to the socket
        when the server allows it (`ChunkWriter`), else through ASGI too."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        writer = ChunkWriter.for_scope(self._scope)
        if writer is None:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        else:
            write = writer.write
            async for chunk in self.body_iterator:
                if not write(cast(bytes, chunk)):  # the relay yields bytes
                    return
                if writer.paused:
                    await writer.drain()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


_VLLM_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}


def vllm_gauges(metrics_text: str) -> dict[str, float | None]:
    """Each gauge of `_VLLM_GAUGES` over its label sets (engines); None when absent.

    Request counts add up over engines; KV-cache use is a share per engine, so the fullest one
    is reported (two engines at 80 % are 80 %, not 160 %), as across replicas.
    """
    found: dict[str, float | None] = dict.fromkeys(_VLLM_GAUGES.values())
    for line in metrics_text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        key = _VLLM_GAUGES.get(name)
        if key is None:
            continue
        value, known = float(line.rsplit(" ", 1)[1]), found[key]
        merge = max if key == "kv_cache_usage" else operator.add
        found[key] = value if known is None else merge(known, value)
    return found


def _new_record(path: str, upstream: str, payload: dict[str, Any] | None) -> RequestRecord:
    payload = payload or {}
    model = payload.get("model")
    return RequestRecord(path, upstream, payload.get("stream") is True, model if isinstance(model, str) else None)


def no_healthy_replica(exc: NoHealthyReplicaError) -> Response:
    return error_response(503, f"upstream unavailable: no healthy replica: {exc}", headers={"Retry-After": "5"})


def upstream_failure(exc: BaseException, before_answer: bool = False) -> Response:
    """504 on a timeout, 503 when nothing listens upstream, 502 when it broke mid-answer.

    `before_answer`: the connection failed before any answer came (e.g. reset by a vLLM that
    just died): the upstream is unavailable, so 503 with Retry-After too.
    """
    if isinstance(exc, UpstreamSilent):
        return error_response(504, str(exc))
    if isinstance(exc, asyncio.TimeoutError):
        return error_response(504, "upstream did not answer in time")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ServerDisconnectedError) or (
        before_answer and isinstance(exc, aiohttp.ClientOSError)
    ):
        return error_response(503, f"upstream unavailable: {exc}", headers={"Retry-After": "5"})
    return error_response(502, f"upstream error: {exc!r}")


def _error_event(status: int, message: str) -> bytes:
    return b"data: " + json.dumps(error_body(status, message)).encode() + b"\n\n"


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, awaitable: Awaitable[T], timeout_s: float | None = None) -> T:
    """Await `awaitable` unless the client disconnects first or `timeout_s` passes (then cancel
    it and raise ClientDisconnectedError or UpstreamSilent)."""
    work: asyncio.Future[T] = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_wait_disconnect(request.receive))
    either: set[asyncio.Future[Any]] = {work, watch}
    try:
        await asyncio.wait(either, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    if watch.done() and not watch.cancelled():
        raise ClientDisconnectedError
    raise UpstreamSilent(f"the upstream did not start answering in {timeout_s:g} s")
