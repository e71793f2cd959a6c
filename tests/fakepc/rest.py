"""The REST half of the fake (HTTP/1.1 JSON): the routes polars-cloud 0.12.0 calls, plus OAuth."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from tests.fakepc import manifests
from tests.fakepc.control import Call, ControlPlane, NotFound
from tests.fakepc.tokens import bearer_of, client_credentials

TOKEN_PATH = "/realms/Polars/protocol/openid-connect/token"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message, "errors": {}}, status_code=status)


def _page(items: list[dict[str, Any]], page: int, limit: int) -> dict[str, Any]:
    limit = max(limit, 1)
    page = max(page, 1)
    total_pages = max((len(items) + limit - 1) // limit, 1)
    return {
        "result": items[(page - 1) * limit : page * limit],
        "pagination": {
            "page": page,
            "limit": limit,
            "amount": len(items[(page - 1) * limit : page * limit]),
            "total_pages": total_pages,
            "total_count": len(items),
        },
    }


def create_app(plane: ControlPlane) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def gate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """Error bursts, bearer checks and the call log, in front of every route."""
        path = request.url.path
        bearer = bearer_of(request.headers.get("authorization"))
        response: Response
        if path == TOKEN_PATH:
            response = await call_next(request)
        elif (burst := plane.take_burst()) is not None:
            response = _error(burst, f"fake: injected HTTP {burst}")
        elif (claims := plane.auth.verify(bearer)) is None:
            response = _error(401, "missing, unknown, expired or revoked bearer token")
        else:
            request.state.user_id = str(claims.get("sub"))
            response = await call_next(request)
        plane.record(Call(request.method, path, bearer, response.status_code))
        return response

    @app.post(TOKEN_PATH)
    async def token(request: Request) -> JSONResponse:
        grant_type, client_id, client_secret = client_credentials(
            await request.body(), request.headers.get("authorization")
        )
        if grant_type != "client_credentials":
            return JSONResponse(
                {"error": "unsupported_grant_type", "error_description": str(grant_type)},
                status_code=400,
            )
        grant = plane.auth.grant(client_id or "", client_secret or "")
        if client_id is None or client_secret is None or grant is None:
            return JSONResponse(
                {"error": "invalid_client", "error_description": "Invalid client credentials"},
                status_code=401,
            )
        return JSONResponse(
            {
                "access_token": grant.access_token,
                "token_type": "Bearer",
                "expires_in": grant.expires_in,
                "refresh_expires_in": 0,
                "not-before-policy": 0,
                "scope": "profile email",
            },
            headers={"cache-control": "no-store", "pragma": "no-cache"},
        )

    def workspace_or_404(workspace_id: str) -> JSONResponse | None:
        if workspace_id != plane.workspace_id:
            return _error(404, f"workspace {workspace_id} not found")
        return None

    @app.get("/api/v1/user/me")
    async def me(request: Request) -> JSONResponse:
        return JSONResponse(plane.user_json(request.state.user_id))

    @app.get("/api/v1/workspace")
    async def workspaces(name: str | None = None, page: int = 1, limit: int = 1000) -> JSONResponse:
        items = [plane.workspace_json()] if name in (None, plane.workspace_name) else []
        return JSONResponse(_page(items, page, limit))

    @app.get("/api/v1/workspace/{workspace_id}")
    async def workspace(workspace_id: str) -> JSONResponse:
        return workspace_or_404(workspace_id) or JSONResponse(plane.workspace_json())

    @app.get("/api/v1/organization/{organization_id}")
    async def organization(organization_id: str) -> JSONResponse:
        if organization_id != plane.organization_id:
            return _error(404, f"organization {organization_id} not found")
        return JSONResponse(plane.organization_json())

    @app.get("/api/v1/workspace/{workspace_id}/cluster-defaults")
    async def cluster_defaults(workspace_id: str) -> JSONResponse:
        return workspace_or_404(workspace_id) or JSONResponse(None)

    @app.post("/api/v1/workspace/{workspace_id}/compute/start")
    async def start(workspace_id: str, request: Request) -> JSONResponse:
        if (missing := workspace_or_404(workspace_id)) is not None:
            return missing
        if plane.take_fail_start():
            return _error(500, "fake: compute start failed")
        try:
            body = json.loads(await request.body())
        except ValueError:
            return _error(400, "body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        c = plane.start_compute(workspace_id, request.state.user_id, body)
        if plane.hang_start_answers_s:
            await asyncio.sleep(plane.hang_start_answers_s)
        if plane.take_lost_start():
            return _error(500, "fake: the start's answer was lost")
        return JSONResponse(plane.get_compute(workspace_id, c.id))

    @app.get("/api/v1/workspace/{workspace_id}/compute")
    async def list_computes(
        workspace_id: str, status: str | None = None, page: int = 1, limit: int = 1000
    ) -> JSONResponse:
        if (missing := workspace_or_404(workspace_id)) is not None:
            return missing
        wanted = {s for s in status.split(",") if s} if status else None
        return JSONResponse(_page(plane.list_computes(workspace_id, wanted), page, limit))

    @app.get("/api/v1/workspace/{workspace_id}/compute/{compute_id}")
    async def get_compute(workspace_id: str, compute_id: str) -> JSONResponse:
        try:
            return JSONResponse(plane.get_compute(workspace_id, compute_id))
        except NotFound as exc:
            return _error(404, str(exc))

    @app.post("/api/v1/workspace/{workspace_id}/compute/{compute_id}/stop")
    async def stop(workspace_id: str, compute_id: str) -> Response:
        if plane.take_fail_stop():
            return _error(500, "fake: compute stop failed")
        try:
            plane.stop_compute(workspace_id, compute_id)
        except NotFound as exc:
            return _error(404, str(exc))
        return Response(status_code=200)

    @app.get("/api/v1/workspace/{workspace_id}/query/{query_id}")
    async def get_query(workspace_id: str, query_id: str) -> JSONResponse:
        try:
            return JSONResponse(plane.query_json(workspace_id, query_id))
        except NotFound as exc:
            return _error(404, str(exc))

    @app.post("/api/v1/workspace/{workspace_id}/query/{query_id}/cancel")
    async def cancel_query(workspace_id: str, query_id: str) -> Response:
        try:
            plane.cancel_query(workspace_id, query_id)
        except NotFound as exc:
            return _error(404, str(exc))
        return Response(status_code=200)

    app.include_router(manifests.router(plane))

    @app.api_route(
        "/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def unknown(rest: str) -> JSONResponse:
        return _error(404, f"fakepc does not implement /{rest}")

    return app
