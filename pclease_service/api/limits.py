"""Request-size limits, enforced before a body is read whole."""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pclease_service.api.errors import error_response

_QUERY_SUBMIT = re.compile(r"^/v1/leases/[^/]+/queries/?$")


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before they are read whole.

    A body with a Content-Length over the limit is refused unread; one within it is handed
    on as it arrives (the server never reads past the declared length). A body sent chunked
    (no Content-Length) is read here, counted chunk by chunk, refused as soon as it passes
    the limit and otherwise handed on in one piece, so the routes never see a half-read
    body.
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
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if b"transfer-encoding" not in headers and declared in (None, b"0"):
            # No body (a request without either header has none in HTTP/1.1): nothing to
            # count or buffer; most lease requests (heartbeat, GET, release) are these.
            await self.app(scope, receive, send)
            return
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        if b"transfer-encoding" not in headers and declared is not None and declared.isdigit():
            # The server reads exactly the declared length and no more, so a body declared
            # within the limit stays within it: it goes to the route as it arrives, and a
            # plan is not held twice (here, and again by the multipart parser).
            await self.app(scope, receive, send)
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
