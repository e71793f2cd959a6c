"""Logging set-up: plain text by default, or one JSON object a line (``log_format = "json"``).

JSON lines carry ``lease_id``, ``context_id`` and ``query_id`` whenever the line is about
one: taken from ``extra=``, from the request being served (its path, or the lease a
``POST /v1/leases`` created), or from the message itself (``"context %s failed"`` with a
UUID argument names a context). With JSON logging on, every request is logged once on
``pclease.access`` with its method, path, status and duration.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pclease_service.config import LogFormat

ID_FIELDS = ("lease_id", "context_id", "query_id")
_bound: ContextVar[dict[str, str] | None] = ContextVar("pclease_log_ids", default=None)
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_PLACEHOLDER = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?[sdrifgxXeEcoa%]")
_PATH_IDS = re.compile(r"/(leases|contexts|queries)/([0-9a-f-]{36})(?:/|$)")
_PATH_FIELD = {"leases": "lease_id", "contexts": "context_id", "queries": "query_id"}
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _ids_from_message(record: logging.LogRecord) -> dict[str, str]:
    if not isinstance(record.msg, str) or not isinstance(record.args, tuple):
        return {}
    found: dict[str, str] = {}
    position = 0
    for match in _PLACEHOLDER.finditer(record.msg):
        if match.group() == "%%":
            continue
        if position >= len(record.args):
            break
        arg = record.args[position]
        position += 1
        words = record.msg[: match.start()].split()
        noun = words[-1].lower() if words else ""
        if isinstance(arg, str) and _UUID.match(arg) and noun in ("context", "lease", "query"):
            found.setdefault(f"{noun}_id", arg)
    return found


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, ids, extras, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        data.update(_ids_from_message(record))
        data.update(_bound.get() or {})
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure(log_format: LogFormat, level: str) -> None:
    """Set up the root logger once, at ``pclease serve``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def bind(**ids: str) -> None:
    """Attach ids to every line logged from here on in this task (the request's)."""
    _bound.set({**(_bound.get() or {}), **ids})


class RequestLog:
    """ASGI middleware: bind the ids a request names, and log it once when it is done."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.log = logging.getLogger("pclease.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        ids = {_PATH_FIELD[m.group(1)]: m.group(2) for m in _PATH_IDS.finditer(path)}
        token = _bound.set(ids)
        started = time.perf_counter()
        status = 500
        created = scope.get("method") == "POST" and path.rstrip("/") == "/v1/leases"
        body: list[bytes] = []

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and created and status == 201:
                body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if body:
                try:
                    lease = json.loads(b"".join(body))
                    ids.update(lease_id=str(lease["id"]), context_id=str(lease["context_id"]))
                except (ValueError, KeyError, TypeError):
                    pass
            self.log.info(
                "%s %s %d",
                scope.get("method"),
                path,
                status,
                extra={
                    "method": scope.get("method"),
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    **ids,
                },
            )
            _bound.reset(token)
