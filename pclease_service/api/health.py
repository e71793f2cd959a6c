"""``/healthz`` (the process answers, and how its backend does) and ``/readyz`` (this
replica can serve), unauthenticated.

Readiness is about this replica only, so that a load balancer pulls a replica that cannot
serve and never all of them for a problem they share: the database (one round trip), its
loops (reconciler, query runner, heartbeat) and whether it drains (SIGTERM). The backend's
health (the credentials' cached status, never fetched by a probe; the backend listed when
listing is cheap, otherwise the reconciler's sweeps) is on ``/healthz``'s ``checks``, the
dashboard and ``/metrics``: a Polars Cloud outage or a bad secret fails lease requests
that need a new context, with a message saying so, not the replicas.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from pclease_service.api.deps import ServiceDep
from pclease_service.api.schemas import Health, Readiness
from pclease_service.clock import within
from pclease_service.errors import BackendError
from pclease_service.runtime import Service
from pclease_service.store import reads

router = APIRouter(tags=["health"])

# A probe waits at most this long for a backend that lists cheaply.
_LIST_TIMEOUT_S = 5.0


@router.get(
    "/healthz",
    responses={
        200: {
            "model": Health,
            "description": "The process answers; ``checks`` says how its backend does.",
        }
    },
)
async def healthz(service: ServiceDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    _credentials(service, checks)
    await _backend(service, checks)
    return JSONResponse({"status": "ok", "checks": checks})


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness, "description": "Ready: every check says ok."},
        503: {"model": Readiness, "description": "Not ready: the failing checks say why."},
    },
)
async def readyz(service: ServiceDep) -> JSONResponse:
    checks: dict[str, Any] = {}
    results = [
        await _database(service, checks),
        _reconciler(service, checks),
        _replica(service, checks),
    ]
    ok = all(results)
    return JSONResponse(
        {"status": "ok" if ok else "failing", "checks": checks},
        status_code=200 if ok else 503,
    )


async def _database(service: Service, checks: dict[str, Any]) -> bool:
    try:
        await service.db.read(reads.ping)
    except Exception as exc:  # any failure here means "not ready", with the reason
        checks["database"] = f"failing: {type(exc).__name__}"
        return False
    checks["database"] = "ok"
    return True


def _credentials(service: Service, checks: dict[str, Any]) -> bool:
    credentials = service.credentials
    if credentials is None:
        return True
    # The cached status only: the background check and every backend call keep it current.
    problem = credentials.status().problem
    checks["credentials"] = "ok" if problem is None else f"failing: {problem}"
    return problem is None


async def _backend(service: Service, checks: dict[str, Any]) -> bool:
    if not service.backend.capabilities.list_is_cheap:
        # A remote backend is never called from a probe: its reconciler's sweeps say.
        ok, checks["backend"] = _sweeps(service)
        return ok
    timeout_s = min(_LIST_TIMEOUT_S, service.settings.backend_call_timeout_s)
    try:
        await within(service.clock, timeout_s, service.backend.list())
    except TimeoutError:
        checks["backend"] = f"failing: no answer within {_LIST_TIMEOUT_S:g} s"
        return False
    except Exception as exc:
        detail = str(exc) if isinstance(exc, BackendError) else type(exc).__name__
        checks["backend"] = f"failing: {detail}"
        return False
    checks["backend"] = "ok"
    return True


def _sweeps(service: Service) -> tuple[bool, str]:
    """(ready, what to show) from the reconciler's sweeps. One failed sweep is shown but
    not fatal; no successful one for ``backend_unready_after_s`` is."""
    sweeper = service.reconciler.sweeper
    if sweeper.error is None:
        return True, "ok" if sweeper.listed_at else "ok (not listed yet)"
    since = sweeper.listed_at or service.started_at
    failing_s = (service.clock.now() - since).total_seconds()
    limit_s = service.settings.backend_unready_after_s
    if failing_s < limit_s:
        return True, f"ok (the last listing failed: {sweeper.error}; unready after {limit_s:g} s)"
    return False, f"failing: {sweeper.error} (not listed for {failing_s:.0f} s)"


def _reconciler(service: Service, checks: dict[str, Any]) -> bool:
    if service.reconciler_alive:
        checks["reconciler"] = "ok"
        return True
    checks["reconciler"] = "the reconciler loop has stopped; restart the service"
    return False


def _replica(service: Service, checks: dict[str, Any]) -> bool:
    if service.draining:
        checks["replica"] = f"draining: replica {service.replica_id} is shutting down"
        return False
    checks["replica"] = "ok"
    return True
