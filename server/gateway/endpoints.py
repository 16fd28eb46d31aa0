"""The gateway's HTTP surface: one line per endpoint, the work is in `server/gateway/proxy.py`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.control.hybrid_routing import routed_remote
from server.gateway.catalog import ModelCatalog
from server.gateway.errors import REFUSALS, error_response
from server.gateway.proxy import UpstreamProxy
from server.gateway.validation import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    check_served,
    check_unicode,
    openapi_body,
    validate_chat,
    validate_completion,
)
from server.runtime.vllm_supervisor import VllmSupervisor
from server.telemetry.recorder import RequestRecorder
from server.telemetry.stats import MAX_WINDOW_S


def get_proxy(request: Request) -> UpstreamProxy:
    """The local upstream, or the remote one for a request routed there (server/control/hybrid_routing.py)."""
    if routed_remote(request.scope):
        return request.app.state.remote_proxy
    return request.app.state.proxy


def get_supervisor(request: Request) -> VllmSupervisor | None:
    return request.app.state.supervisor


def get_recorder(request: Request) -> RequestRecorder | None:
    return request.app.state.recorder


ProxyDep = Annotated[UpstreamProxy, Depends(get_proxy)]
SupervisorDep = Annotated[VllmSupervisor | None, Depends(get_supervisor)]
RecorderDep = Annotated[RequestRecorder | None, Depends(get_recorder)]
TELEMETRY_OFF = "telemetry is off (STUDENT_TELEMETRY=false): no metrics or stats"

router = APIRouter()


def get_catalog(request: Request) -> ModelCatalog:
    """The app's cache of served models (made in `create_app`)."""
    return request.app.state.model_catalog


def get_body_limit(request: Request) -> int:
    """Largest request body accepted, bytes (`settings.max_body_bytes`)."""
    return request.app.state.settings.max_body_bytes


CatalogDep = Annotated[ModelCatalog, Depends(get_catalog)]
BodyLimitDep = Annotated[int, Depends(get_body_limit)]


@router.post("/v1/chat/completions", openapi_extra=openapi_body(ChatRequest), responses=REFUSALS)
async def chat_completions(request: Request, proxy: ProxyDep, catalog: CatalogDep, limit: BodyLimitDep) -> Response:
    return await _forward_json(request, proxy, "/v1/chat/completions", validate_chat, catalog, limit)


@router.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest), responses=REFUSALS)
async def completions(request: Request, proxy: ProxyDep, catalog: CatalogDep, limit: BodyLimitDep) -> Response:
    return await _forward_json(request, proxy, "/v1/completions", validate_completion, catalog, limit)


async def _forward_json(
    request: Request,
    proxy: UpstreamProxy,
    path: str,
    validate: Callable[[dict[str, Any]], ChatRequest | CompletionRequest | RequestError],
    catalog: ModelCatalog,
    body_limit: int,
) -> Response:
    """Read, parse and check the body, then forward its original bytes.

    Whatever the gateway refuses (413, 400, 404) is answered here and accounted (proxy.reject).
    """
    body = await read_body(request, body_limit)
    if body is None:
        message = f"request body is larger than {body_limit} bytes"
        return proxy.reject(path, None, error_response(413, message, headers={"Connection": "close"}), request)
    try:
        payload = json.loads(body, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return proxy.reject(path, None, error_response(400, f"request body is not valid JSON: {exc}"), request)
    if not isinstance(payload, dict):
        return proxy.reject(path, None, error_response(400, "request body must be a JSON object"), request)
    checked = check_unicode(body, payload) or validate(payload)
    if isinstance(checked, RequestError):
        return proxy.reject(path, payload, checked.response(), request)
    if proxy.target.route == "local":  # the remote gets its own model name and judges the rest itself
        served = await catalog.served(checked.model, lambda: _fetch_models(proxy))
        refusal = check_served(checked, served)
        if refusal is not None:
            return proxy.reject(path, payload, refusal.response(), request)
    return await proxy.forward(request, path, body, payload)


async def read_body(request: Request, limit_bytes: int) -> bytes | None:
    """The whole body, or None as soon as it is known to exceed `limit_bytes`.

    A declared Content-Length over the limit is refused before reading anything; a chunked
    upload is counted as it arrives, so an endless one costs at most `limit_bytes` of memory.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    """`NaN`, `Infinity` and `-Infinity` are Python's JSON extensions, not JSON (RFC 8259)."""
    raise ValueError(f"{name} is not a JSON value")


async def _fetch_models(proxy: UpstreamProxy) -> bytes | None:
    """The upstream's GET /v1/models body, or None when it did not answer 200."""
    response = await proxy.get("/v1/models")
    return bytes(response.body) if response.status_code == 200 else None


@router.get("/v1/models")
async def models(proxy: ProxyDep) -> Response:
    return await proxy.get("/v1/models")


@router.get("/health")
async def health() -> dict[str, str]:
    """The gateway process is alive (says nothing about vLLM: see /ready)."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(proxy: ProxyDep, supervisor: SupervisorDep) -> Response | dict[str, Any]:
    """200 when an upstream replica answers its /health, else 503 with each one's reason."""
    reason = await proxy.check_ready()
    if reason is None:
        replicas = [{key: replica[key] for key in ("url", "healthy", "reason")} for replica in proxy.balancer.status()]
        return {"status": "ready", "upstream": proxy.base_url, "replicas": replicas}
    if supervisor is not None:
        state, detail = supervisor.status()
        reason = f"{reason} (vLLM {state}: {detail})"
    return error_response(503, reason, headers={"Retry-After": "5"})


@router.get("/metrics")
async def metrics(recorder: RecorderDep) -> Response:
    """Prometheus text: latency histograms, request/token/energy counters, live gauges."""
    if recorder is None:
        return error_response(404, TELEMETRY_OFF)
    return Response(recorder.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/stats", response_model=None)
async def stats(
    request: Request,
    recorder: RecorderDep,
    proxy: ProxyDep,
    window: Annotated[float | None, Query(gt=0, le=MAX_WINDOW_S, description="seconds; default: since start")] = None,
) -> Response | dict:
    """Requests, tokens, latency percentiles, energy and money as JSON (schema in docs/api.md)."""
    if recorder is None:
        return error_response(404, TELEMETRY_OFF)
    document = recorder.stats(window, await proxy.vllm_load(), proxy.balancer.status())
    document["admission"] = request.app.state.slots.status()  # the line now and refusals since start
    return document
