"""Build the gateway application; its lifespan owns the pooled upstream HTTP client."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.errors import install_error_handlers
from server.proxy import UpstreamProxy, create_upstream_session
from server.routes import router
from server.settings import Settings
from server.supervisor import VllmSupervisor
from server.telemetry import RequestRecord, describe


def create_app(settings: Settings, supervisor: VllmSupervisor | None = None) -> FastAPI:
    """The gateway for `settings.upstream_base_url`; `supervisor` (if any) explains /ready."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = create_upstream_session(settings)
        app.state.proxy = UpstreamProxy(
            session,
            settings.upstream_base_url,
            settings.ready_timeout_s,
            on_finished=_log_request if settings.access_log else None,
        )
        app.state.supervisor = supervisor
        try:
            yield
        finally:
            await session.close()

    app = FastAPI(title="student-serve gateway", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(router)
    return app


def _log_request(record: RequestRecord) -> None:
    print(f"[request] {describe(record)}", file=sys.stderr, flush=True)
