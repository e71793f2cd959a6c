"""The FastAPI application: lifespan, error mapping and the request-size guard (its OpenAPI
document is finished in :mod:`service.api.openapi`)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pclease_service import __version__, dashboard, logs, metrics
from pclease_service.api import openapi, v1
from pclease_service.api.deps import ServiceDep, TokenCache
from pclease_service.api.schemas import Readiness
from pclease_service.backends.base import BackendError
from pclease_service.config import LogFormat
from pclease_service.errors import CapacityExhausted, PcleaseError
from pclease_service.runtime import Service
from pclease_service.text import message_of, shown

log = logging.getLogger("pclease.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def error_response(status: int, code: str, message: str, **headers: str) -> JSONResponse:
    # A message may quote what the caller sent; a lone surrogate in it would make the
    # answer itself fail to encode.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def _describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors():
        loc = [shown(str(part)) for part in error.get("loc", ())]
        where = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc)
        kind = loc[0] if loc else "request"
        if error.get("type") == "json_invalid":
            problems.append("the body is not valid JSON; send a JSON object")
            continue
        if not where and kind == "body":
            problems.append(
                "the body must be a JSON object, sent with Content-Type: application/json"
            )
            continue
        message = message_of(error)
        if error.get("type") == "extra_forbidden":
            message = "unknown field; remove it"
        elif error.get("type") in ("model_attributes_type", "model_type", "dict_type"):
            message = "must be a JSON object"
        problems.append(f"{kind} {where}: {message}" if where else f"{kind}: {message}")
    return "; ".join(problems) or "invalid request"


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: the methods of every route on the request's path.

    Starlette names only the methods of the first route whose path matched, and each
    method of a path is its own route here (``/v1/leases`` has three).
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        if not isinstance(route, Route) or not route.methods:
            continue
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


_QUERY_SUBMIT = re.compile(r"^/v1/leases/[^/]+/queries/?$")


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before they are read whole.

    The body is read here, counted chunk by chunk, and handed on in one piece: a body sent
    chunked (no Content-Length) is refused as soon as it passes the limit, and the routes
    never see a half-read body. Bodies are small JSON documents, so buffering costs little.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_plan_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        # Query submissions carry plan bytes and get their own, larger limit.
        self.max_plan_bytes = max_plan_bytes or max_bytes

    def _limit(self, scope: Scope) -> int:
        if scope.get("method") == "POST" and _QUERY_SUBMIT.match(scope.get("path", "")):
            return self.max_plan_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away: the app hears it on its first receive()
            body = message.get("body", b"")
            seen += len(body)
            if seen > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        pending = [message]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        what = "plan" if limit == self.max_plan_bytes != self.max_bytes else "request body"
        response = error_response(
            413,
            "payload_too_large",
            f"the {what} is larger than {limit} bytes; send less (plans: sink large "
            "inputs to storage and scan them instead of embedding DataFrames)",
        )
        await response(scope, receive, send)


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
    app.state.token_cache = TokenCache(service.settings.token_cache_s)
    app.include_router(v1.router)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=service.settings.max_request_bytes,
        max_plan_bytes=service.settings.max_plan_bytes,
    )

    @app.exception_handler(PcleaseError)
    async def _domain_error(request: Request, exc: PcleaseError) -> JSONResponse:
        headers = {}
        if isinstance(exc, CapacityExhausted):
            headers["Retry-After"] = str(exc.retry_after_s)
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(exc.status, exc.code, exc.message, **headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_input", _describe_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 400:
            # FastAPI's answer when a body cannot be decoded at all (not UTF-8, a number
            # too long to parse): its own detail does not say what to do.
            message = "the body could not be read; send a UTF-8 encoded JSON object"
        elif exc.status_code == 404:
            message = f"no route {request.url.path}; the API is described at /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}; see /docs"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return error_response(exc.status_code, code, message, **headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.error(
            "unexpected error (incident %s) on %s %s",
            incident,
            request.method,
            request.url.path,
            exc_info=exc,
        )
        return error_response(
            500,
            "internal_error",
            f"unexpected error; nothing was changed by it if it was a read. Report incident "
            f"{incident} to the operators (it is in the service log)",
        )

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        responses={
            200: {"model": Readiness, "description": "Ready: every check says ok."},
            503: {"model": Readiness, "description": "Not ready: the failing checks say why."},
        },
    )
    async def readyz(svc: ServiceDep) -> JSONResponse:
        checks: dict[str, Any] = {}
        ok = True
        try:
            await svc.db.read(lambda tx: tx.conn.execute(text("SELECT 1")).scalar())
            checks["database"] = "ok"
        except Exception as exc:  # any failure here means "not ready", with the reason
            ok = False
            checks["database"] = f"failing: {type(exc).__name__}"
        if svc.credentials is not None:
            # The cached status only: a probe never fetches a token (the background check
            # and every backend call keep it current).
            status = svc.credentials.status()
            if status.ok:
                checks["credentials"] = "ok"
            else:
                ok = False
                checks["credentials"] = (
                    f"failing: the Polars Cloud credentials from {status.source} do not "
                    f"work: {status.message or 'unknown problem'}"
                )
        if not svc.backend.list_is_cheap:
            # A remote backend is never called from a probe: its reconciler's sweeps say.
            backend_ok, checks["backend"] = svc.backend_readiness()
            ok = ok and backend_ok
        else:
            try:
                await asyncio.wait_for(
                    svc.backend.list(), min(5.0, svc.settings.backend_call_timeout_s)
                )
                checks["backend"] = "ok"
            except TimeoutError:
                ok = False
                checks["backend"] = "failing: no answer within 5 s"
            except Exception as exc:
                ok = False
                detail = str(exc) if isinstance(exc, BackendError) else type(exc).__name__
                checks["backend"] = f"failing: {detail}"
        if svc.reconciler_alive:
            checks["reconciler"] = "ok"
        else:
            ok = False
            checks["reconciler"] = "the reconciler loop has stopped; restart the service"
        return JSONResponse(
            {"status": "ok" if ok else "failing", "checks": checks},
            status_code=200 if ok else 503,
        )

    ledger = metrics.install(app, service)
    dashboard.install(app, service, ledger)
    if service.settings.log_format is LogFormat.JSON:
        app.add_middleware(logs.RequestLog)
    return app
