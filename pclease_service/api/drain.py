"""While the replica drains, every request but the probes and /metrics is answered 503
``draining`` with ``Retry-After``, and the connection is closed, so the client (or the
load balancer) sends it to another replica."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from pclease_service.api.errors import error_response
from pclease_service.errors import Draining
from pclease_service.runtime import Service

_ALWAYS = ("/healthz", "/readyz", "/metrics")


class DrainGate:
    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.service.draining
            and not scope.get("path", "").startswith(_ALWAYS)
        ):
            # Read the body first: closing a socket with unread request bytes makes the
            # kernel send a reset, which can destroy this answer before the client (or a
            # load balancer in between) has read it; the client then cannot tell that the
            # request was refused and may be sent again.
            await _discard_body(receive)
            refusal = Draining()
            response = error_response(
                refusal.status,
                refusal.code,
                refusal.message,
                None,
                **{"Retry-After": str(refusal.retry_after_s), "Connection": "close"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _discard_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
