"""The one place errors become HTTP answers: ``{"error": {"code", "message"}}``.

:class:`~pclease_service.errors.PcleaseError` carries its own status and code; FastAPI's
validation errors and Starlette's HTTP errors are reworded to say what to send instead; any
other exception is a 500 with an incident id that is in the log, never a stack trace.
"""

from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pclease_service.errors import CapacityExhausted, Draining, PcleaseError
from pclease_service.text import message_of, shown
from pclease_service.web import allowed_methods

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


def describe_validation(exc: RequestValidationError) -> str:
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


def install(app: FastAPI) -> None:
    """Register the handlers on ``app`` (before the dashboard adds its page handlers)."""

    @app.exception_handler(PcleaseError)
    async def _domain_error(request: Request, exc: PcleaseError) -> JSONResponse:
        headers = {}
        if isinstance(exc, CapacityExhausted | Draining):
            headers["Retry-After"] = str(exc.retry_after_s)
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(exc.status, exc.code, exc.message, **headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid_input", describe_validation(exc))

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
