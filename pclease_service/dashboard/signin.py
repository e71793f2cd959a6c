"""Signing in and out of the dashboard (see :mod:`.sessions` for the cookies)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from pclease_service.dashboard.render import Dashboard, DashDep, ViewerDep, set_cookie
from pclease_service.dashboard.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    new_login_nonce,
    safe_next,
)
from pclease_service.errors import PageError

router = APIRouter(prefix="/ui", include_in_schema=False)
root_router = APIRouter(include_in_schema=False)


@root_router.get("/")
async def root() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


# -- sign-in -----------------------------------------------------------------------------------


def _login_page(
    request: Request, dash: Dashboard, next_path: str, *, error: str = "", status: int = 200
) -> HTMLResponse:
    nonce = new_login_nonce()
    response = dash.render(
        request,
        "login.html",
        login_csrf=nonce,
        next_path=safe_next(next_path),
        error=error,
        notice=request.query_params.get("notice", "")[:40],
        status=status,
    )
    set_cookie(
        request, response, LOGIN_COOKIE, nonce, samesite="strict", path="/ui/login", max_age=3600
    )
    return response


@router.get("/login")
async def login_form(
    request: Request,
    dash: DashDep,
    next: Annotated[str, Query(max_length=2000)] = "/ui/",
) -> Response:
    return _login_page(request, dash, next)


@router.post("/login")
async def login(
    request: Request,
    dash: DashDep,
    token: Annotated[str, Form(max_length=500)] = "",
    csrf: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/ui/",
) -> Response:
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not csrf or not hmac.compare_digest(expected, csrf):
        return _login_page(
            request,
            dash,
            next,
            error="The sign-in form expired or was not sent from this page; try again.",
            status=400,
        )
    value = token.strip()
    if not value:
        return _login_page(request, dash, next, error="Paste a pclease token.", status=422)
    principal = await dash.service.principals.by_token(value)
    if principal is None:
        return _login_page(
            request,
            dash,
            next,
            error="That token is unknown or revoked. Create one with "
            "`pclease token create NAME --scope read`.",
            status=401,
        )
    if not principal.can_read_all:
        return _login_page(
            request,
            dash,
            next,
            error=f"Token {principal.name!r} has only the {', '.join(sorted(principal.scopes))} "
            "scope; the dashboard needs read or admin.",
            status=403,
        )
    cookie, _ = dash.signer.issue(principal.token_id)
    response = RedirectResponse(safe_next(next), status_code=303)
    set_cookie(
        request,
        response,
        SESSION_COOKIE,
        cookie,
        samesite="lax",
        path="/ui",
        max_age=int(dash.signer.ttl_s),
    )
    response.delete_cookie(LOGIN_COOKIE, path="/ui/login")
    return response


@router.post("/logout")
async def logout(
    request: Request,
    dash: DashDep,
    viewer: ViewerDep,
    csrf: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    if not dash.signer.check_csrf(viewer.session, csrf):
        raise PageError(403, "Form expired", "Reload the page and sign out again.")
    response = RedirectResponse("/ui/login?notice=signed-out", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/ui")
    return response
