"""The dashboard: server-rendered pages under ``/ui`` for people who run pclease.

::

    render.py    the per-app Dashboard (templates, the signed-in viewer), view models
    pages.py     the pages (overview, context, lease, runs, events) and the refresh probe
    actions.py   the admin actions (force-stop a context, revoke a lease)
    signin.py    signing in and out
    sessions.py  sign-in cookies and CSRF tokens
    charts.py    inline SVG

and ``templates/`` and ``static/`` (one CSS and one JS file, served by the service: nothing
comes from a CDN). The SQL behind the pages is the read model in
:mod:`pclease_service.store.reads`; changes go through the domain managers.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI, Request, Response

    from pclease_service.ledger import InstanceLedger
    from pclease_service.runtime import Service


def install(app: FastAPI, service: Service, ledger: InstanceLedger) -> None:
    """Mount the pages, their static files and their HTML error pages on ``app``.

    Call it after the API's own exception handlers are registered: for paths under
    ``/ui`` it answers validation errors and unknown routes with HTML pages and hands every
    other path to the handler that was there before.
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, RedirectResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from pclease_service.dashboard import actions, pages, signin
    from pclease_service.dashboard.render import FRAGMENT_HEADER, HERE, Dashboard
    from pclease_service.dashboard.sessions import SESSION_COOKIE, SessionSigner
    from pclease_service.errors import PageError, SignInRequired
    from pclease_service.text import message_of
    from pclease_service.web import allowed_methods

    signer = SessionSigner(lambda: service.session_key, service.settings.session_ttl_s)
    dash = Dashboard(service, signer, ledger)
    app.state.dashboard = dash
    for module in (signin, pages, actions):
        app.include_router(module.router)
    app.include_router(signin.root_router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="ui-static")

    def is_ui(request: Request) -> bool:
        return request.url.path == "/ui" or request.url.path.startswith("/ui/")

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/ui/api/") or (
            request.headers.get(FRAGMENT_HEADER) == "1"
        )

    def page(request: Request, status: int, title: str, message: str) -> Response:
        if wants_json(request):
            return JSONResponse(
                {"error": {"code": title.lower().replace(" ", "_"), "message": message}},
                status_code=status,
            )
        return dash.render(request, "error.html", status=status, title=title, message=message)

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError) -> Response:
        return page(request, exc.status, exc.title, exc.message)

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> Response:
        from urllib.parse import quote

        if wants_json(request):
            response: Response = JSONResponse(
                {"error": {"code": "unauthorized", "message": exc.message}}, status_code=401
            )
        else:
            target = request.url.path if request.method == "GET" else "/ui/"
            if request.method == "GET" and request.url.query:
                target += f"?{request.url.query}"
            response = RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)
        if SESSION_COOKIE in request.cookies:
            response.delete_cookie(SESSION_COOKIE, path="/ui")
        return response

    previous_http = app.exception_handlers.get(StarletteHTTPException)
    previous_invalid = app.exception_handlers.get(RequestValidationError)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if is_ui(request):
            if exc.status_code == 404:
                return page(request, 404, "Not found", "There is no such page; start at /ui/.")
            if exc.status_code == 405:
                response = page(
                    request, 405, "Method not allowed", f"{request.method} is not used here."
                )
                response.headers["Allow"] = allowed_methods(request)
                return response
            return page(request, exc.status_code, "Bad request", str(exc.detail))
        assert previous_http is not None
        return await _call(previous_http, request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        if is_ui(request):
            problems = []
            for error in exc.errors():
                loc = [str(p) for p in error.get("loc", ())]
                name = loc[-1] if loc else "request"
                message = message_of(error)
                problems.append(f"{name}: {message}")
            return page(request, 422, "Bad request", "; ".join(problems) or "invalid request")
        assert previous_invalid is not None
        return await _call(previous_invalid, request, exc)


async def _call(
    handler: Callable[[Request, Any], Response | Awaitable[Response]], request: Request, exc: Any
) -> Response:
    result = handler(request, exc)
    if inspect.isawaitable(result):
        return await result
    return result
