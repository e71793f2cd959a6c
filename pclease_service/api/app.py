"""The FastAPI application factory: lifespan, routers, middleware, error handlers (its
OpenAPI document is finished in :mod:`pclease_service.api.openapi`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from pclease_service import __version__, dashboard, logs, metrics
from pclease_service.api import errors, health, openapi, v1
from pclease_service.api.drain import DrainGate
from pclease_service.api.limits import BodySizeLimit
from pclease_service.config import LogFormat
from pclease_service.ledger import InstanceLedger
from pclease_service.runtime import Service


class _App(FastAPI):
    def openapi(self) -> dict[str, Any]:
        fresh = self.openapi_schema is None
        document = super().openapi()
        return openapi.complete(document) if fresh else document


def create_app(service: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = _App(
        title="pclease",
        version=__version__,
        description="Leases on shared, reference-counted Polars compute contexts.",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    openapi.install_pages(app)
    app.state.service = service
    app.include_router(v1.router)
    app.include_router(health.router)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=service.settings.max_request_bytes,
        max_plan_bytes=service.settings.max_plan_bytes,
    )
    # Outermost but for the request log: a draining replica reads no body.
    app.add_middleware(DrainGate, service=service)
    errors.install(app)
    # One ledger per app: it folds the event log from the start, so a restarted service
    # rebuilds the same numbers.
    ledger = InstanceLedger()
    metrics.install(
        app, service.db, service.clock.now, service.settings.profiles, ledger, service.quotas
    )
    dashboard.install(app, service, ledger)
    if service.settings.log_format is LogFormat.JSON:
        app.add_middleware(logs.RequestLog)
    return app
