"""The gateway's HTTP surface: one line per endpoint, the work is in `server/proxy.py`."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server.errors import error_response
from server.proxy import UpstreamProxy
from server.recorder import RequestRecorder
from server.stats import MAX_WINDOW_S
from server.supervisor import VllmSupervisor


def get_proxy(request: Request) -> UpstreamProxy:
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


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, proxy: ProxyDep) -> Response:
    return await _forward_json(request, proxy, "/v1/chat/completions")


@router.post("/v1/completions")
async def completions(request: Request, proxy: ProxyDep) -> Response:
    return await _forward_json(request, proxy, "/v1/completions")


async def _forward_json(request: Request, proxy: UpstreamProxy, path: str) -> Response:
    """Parse the JSON body; a body that is not a JSON object is refused (and accounted)."""
    body = await request.body()
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return proxy.reject(path, None, error_response(400, f"request body is not valid JSON: {exc}"))
    if not isinstance(payload, dict):
        return proxy.reject(path, None, error_response(400, "request body must be a JSON object"))
    return await proxy.forward(request, path, body, payload)


@router.get("/v1/models")
async def models(proxy: ProxyDep) -> Response:
    return await proxy.get("/v1/models")


@router.get("/health")
async def health() -> dict[str, str]:
    """The gateway process is alive (says nothing about vLLM: see /ready)."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(proxy: ProxyDep, supervisor: SupervisorDep) -> Response | dict[str, str]:
    """200 when the upstream answers its /health, else 503 with the reason."""
    reason = await proxy.check_ready()
    if reason is None:
        return {"status": "ready", "upstream": proxy.base_url}
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
    recorder: RecorderDep,
    proxy: ProxyDep,
    window: Annotated[float | None, Query(gt=0, le=MAX_WINDOW_S, description="seconds; default: since start")] = None,
) -> Response | dict:
    """Requests, tokens, latency percentiles, energy and money as JSON (schema in the README)."""
    if recorder is None:
        return error_response(404, TELEMETRY_OFF)
    return recorder.stats(window, await proxy.vllm_load())
