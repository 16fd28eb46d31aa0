"""Build the gateway application; its lifespan owns every long-lived resource.

The pooled upstream HTTP client, the power source and its sampler thread, the ledger and the
energy-history task are created when the app starts and closed when it stops, in that order
reversed; nothing lives at module level.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from fastapi import FastAPI

from server.accounting.ledger import Ledger
from server.control.admission import AdmissionMiddleware, Slots
from server.control.auth import AccessMiddleware, TokenLimiter, load_keys
from server.control.balancer import Balancer, health_probe
from server.control.hybrid_routing import LocalState, RouteMiddleware, routed_remote
from server.gateway.catalog import ModelCatalog
from server.gateway.client_socket import GatewayApp
from server.gateway.endpoints import router
from server.gateway.errors import install_error_handlers
from server.gateway.proxy import StreamTimeouts, UpstreamProxy, UpstreamTarget, create_upstream_session
from server.runtime.settings import Settings
from server.runtime.vllm_supervisor import VllmSupervisor
from server.telemetry import dashboard
from server.telemetry.dcgm_source import DEFAULT_TIMEOUT_S, DcgmExporterSource
from server.telemetry.energy_attribution import LOCAL_METER, THIS_HOST, EnergyMeter, ReplicaMeter, ReplicaMeters
from server.telemetry.power_limits import apply_power_limit
from server.telemetry.power_sources import PowerSource, UnavailableSource, cuda_visible_devices, detect_power_source
from server.telemetry.recorder import RequestRecorder
from server.telemetry.stream_trace import StreamTrace

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    supervisor: VllmSupervisor | None = None,
    power_source: PowerSource | None = None,
) -> FastAPI:
    """The gateway for `settings.upstream_base_urls` (one or several vLLM replicas).

    `supervisor` (if any) explains /ready. `power_source` replaces the detected one (tests
    replay a trace through it); the app closes whichever source it uses.
    """
    token_limiter = _token_limiter(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = create_upstream_session(settings)
        timeouts = StreamTimeouts(settings.first_token_timeout_s, settings.inter_token_timeout_s)
        balancer = Balancer(settings.upstream_base_urls, health_probe(session, settings.ready_timeout_s))
        health_checks = asyncio.create_task(
            balancer.run_health_checks(settings.health_check_interval_s), name="health-checks"
        )
        app.state.supervisor = supervisor
        app.state.recorder = None
        app.state.remote_proxy = None
        trace = None if settings.stream_trace_path is None else StreamTrace(settings.stream_trace_path)
        if trace is not None:
            logger.warning("tracing every stream's reads and writes into %s (diagnostics)", settings.stream_trace_path)
        try:
            if not settings.telemetry:
                logger.warning("telemetry is off: no metrics, stats, energy or ledger")
                app.state.proxy = UpstreamProxy(
                    session, balancer, settings.ready_timeout_s, stream_timeouts=timeouts, trace=trace
                )
                app.state.remote_proxy = _remote_proxy(settings, session, None, timeouts)
                yield
                return
            async with _telemetry(settings, power_source, token_limiter) as recorder:
                app.state.recorder = recorder
                recorder.metrics.add_replicas(balancer.status)
                recorder.metrics.add_admission(app.state.slots)
                app.state.proxy = UpstreamProxy(
                    session, balancer, settings.ready_timeout_s, recorder, timeouts, trace=trace
                )
                app.state.remote_proxy = _remote_proxy(settings, session, recorder, timeouts)
                yield
        finally:
            health_checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health_checks
            await session.close()
            if trace is not None:
                trace.close()

    app = GatewayApp(title="student-serve gateway", lifespan=lifespan)
    app.state.settings = settings
    app.state.model_catalog = ModelCatalog()
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(dashboard.router)
    slots = app.state.slots = Slots(*settings.admission_limits)

    def vllm_running() -> bool:
        return supervisor is None or supervisor.status()[0] == "running"

    app.add_middleware(AdmissionMiddleware, slots=slots, upstream_ready=vllm_running, bypass=routed_remote)
    if settings.has_remote:  # decides before admission control, which remote requests then skip

        def local_state() -> LocalState:
            proxy = getattr(app.state, "proxy", None)
            healthy = proxy is not None and any(replica.healthy for replica in proxy.balancer.replicas)
            return LocalState(ready=healthy and vllm_running(), at_capacity=slots.full)

        app.add_middleware(
            RouteMiddleware,
            rules=settings.routing_rules,
            local_state=local_state,
            max_body_bytes=settings.max_body_bytes,
        )
    app.add_middleware(
        AccessMiddleware,
        digests=load_keys(settings.api_keys, settings.api_keys_file),
        observability=settings.observability_access,
        requests_per_minute=settings.rate_limit_rpm,
        token_limiter=token_limiter,
    )
    return app


def _remote_proxy(
    settings: Settings, session: aiohttp.ClientSession, recorder: RequestRecorder | None, timeouts: StreamTimeouts
) -> UpstreamProxy | None:
    """The remote upstream of hybrid routing (None without one): the same forwarding, timeouts
    and accounting as local, over a one-replica balancer that is never health-checked (a hosted
    API has no /health; its failures reach the client as they would from vLLM)."""
    if settings.remote_url is None:
        return None
    key = settings.remote_api_key
    target = UpstreamTarget(
        route="remote",
        model=settings.remote_model,
        headers={"authorization": f"Bearer {key}"} if key else {},
        # The gateway's own key (if any) and the route header are for this gateway only.
        drop_headers=frozenset({"authorization", settings.route_header.lower()}),
    )
    balancer = Balancer([settings.remote_url], _always_healthy)
    logger.info("remote upstream %s (model %s) for hybrid routing", settings.remote_url, settings.remote_model)
    return UpstreamProxy(session, balancer, settings.ready_timeout_s, recorder, timeouts, target)


async def _always_healthy(base_url: str) -> None:
    return None


def _token_limiter(settings: Settings) -> TokenLimiter | None:
    """The tokens/minute limit: the access middleware refuses with it, the recorder charges it."""
    if settings.rate_limit_tpm is None:
        return None
    if not settings.telemetry:
        logger.warning(
            "tokens/minute limit (%d) NOT enforced: tokens are counted from vLLM's usage, which needs telemetry",
            settings.rate_limit_tpm,
        )
        return None
    return TokenLimiter(settings.rate_limit_tpm)


@asynccontextmanager
async def _telemetry(
    settings: Settings, power_source: PowerSource | None, token_limiter: TokenLimiter | None = None
) -> AsyncIterator[RequestRecorder]:
    """The energy meters (a sampler thread each), the ledger and the recorder that feeds them (and
    charges `token_limiter`, if any, with each finished request's tokens)."""
    meters, local = _energy_meters(settings, power_source)
    try:
        ledger = Ledger(settings.ledger_path)
        restore_limits = apply_power_limit(settings.power_limit_w, local)
        try:
            for entry in meters.meters:
                where = THIS_HOST if entry.key == LOCAL_METER else f"replica {entry.key}"
                if not entry.meter.start():
                    logger.warning("energy of %s: not measured: %s", where, entry.meter.source.reason)
                elif entry.exporter is not None:
                    every_s = settings.energy_exporter_interval_s
                    logger.info("energy of %s: reading the DCGM exporter %s every %g s", where, entry.exporter, every_s)
                else:
                    logger.info("energy of %s: measuring with %s", where, entry.meter.source.name)
            recorder = RequestRecorder(settings, meters, ledger, token_limiter.charge if token_limiter else None)
            recorder.metrics.add_power_limit(meters.power_limit_w)
            recorder.metrics.add_api_prices(settings.api_prices)
            history = asyncio.create_task(recorder.keep_energy_history(), name="energy-history")
            try:
                yield recorder
            finally:
                history.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await history
                meters.stop()
                recorder.write_energy_rows()
        finally:
            try:
                ledger.close()
            finally:
                restore_limits()
    finally:
        local.close()
        for entry in meters.meters:
            if entry.meter.source is not local:
                entry.meter.source.close()


def _energy_meters(settings: Settings, power_source: PowerSource | None) -> tuple[ReplicaMeters, PowerSource]:
    """One meter per replica with a DCGM exporter (`--energy-exporter`), and one on this host's own
    devices (`power_source`, else NVML or RAPL) for the replicas without one. Returns the meters and
    the local source (unused, and unavailable, when every replica has an exporter)."""
    urls, exporters = settings.upstream_base_urls, settings.energy_exporters
    local_urls = tuple(url for url in urls if url not in exporters)
    entries = []
    if local_urls:
        local = power_source or detect_power_source(
            settings.power_source, nvml_devices=cuda_visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
        )
        meter = EnergyMeter(
            local, idle_w=settings.idle_w, idle_window_s=settings.idle_window_s, sample_hz=settings.energy_sample_hz
        )
        entries.append(ReplicaMeter(LOCAL_METER, meter, local_urls))
    else:
        local = power_source or UnavailableSource("every replica is measured through its own DCGM exporter")
    interval_s = settings.energy_exporter_interval_s
    for url in urls:
        target = exporters.get(url)
        if target is not None:
            source = DcgmExporterSource(target, timeout_s=DEFAULT_TIMEOUT_S)
            meter = EnergyMeter(source, idle_window_s=settings.idle_window_s, sample_hz=1.0 / interval_s)
            entries.append(ReplicaMeter(url, meter, (url,), target.url))
    return ReplicaMeters(entries), local
