"""What every dashboard page shares: the per-app :class:`Dashboard` (templates, the
signed-in viewer), formatting filters and the view models of contexts and leases."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pclease_service.config import Profile
from pclease_service.contexts.rules import planned_stop
from pclease_service.credentials import CredentialStatus
from pclease_service.dashboard.sessions import SESSION_COOKIE, Session, SessionSigner
from pclease_service.errors import PageError, SignInRequired
from pclease_service.ledger import UP_STATES, InstanceLedger
from pclease_service.principals import Principal
from pclease_service.runtime import Service
from pclease_service.states import ContextState, LeaseState, StopKind
from pclease_service.store.contexts import ContextRecord
from pclease_service.store.leases import LeaseRecord

HERE = Path(__file__).parent
#: How each stop kind reads on a page.
STOP_KINDS = {
    StopKind.IDLE: "its idle grace ran out",
    StopKind.MAX_LIFETIME: "it reached its max lifetime",
    StopKind.UNCONFIGURED: "its profile is no longer configured",
    StopKind.FORCED: "an admin stopped it",
    StopKind.SHUTDOWN: "the service shut down",
    StopKind.FAILED: "it failed",
}
_ID = re.compile(r"^[0-9a-fA-F-]{1,36}$")
FRAGMENT_HEADER = "x-pclease-fragment"

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Viewer:
    principal: Principal
    session: Session
    csrf: str

    @property
    def scope(self) -> str:
        return "admin" if self.principal.is_admin else "read"


# -- formatting --------------------------------------------------------------------------------


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def fmt_money(value: float | None) -> str:
    if value is None:
        return "-"
    return f"${value:,.2f}" if value >= 1 else f"${value:.4f}"


def fmt_time(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def iso(value: datetime | None) -> str:
    return "" if value is None else value.isoformat()


def holder_text(lease: LeaseRecord) -> str:
    parts = [p for p in (lease.dag_id, lease.run_id, lease.task_id) if p]
    return " / ".join(parts) if parts else "(no holder given)"


# -- view models -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextView:
    c: ContextRecord
    up_seconds: float
    cost: float
    stops_at: datetime | None
    grace_s: float | None
    holders: list[LeaseRecord]
    queries: int

    @property
    def live(self) -> bool:
        return not self.c.state.is_terminal

    @property
    def ticking(self) -> bool:
        return self.live


def context_view(
    c: ContextRecord,
    profile: Profile | None,
    now: datetime,
    holders: list[LeaseRecord],
    queries: int = 0,
) -> ContextView:
    end = c.stopped_at or now
    up = max(0.0, (end - c.created_at).total_seconds())
    planned = planned_stop(c, profile)
    grace = profile.idle_grace_s if profile else None
    stops_at = planned.at if planned else None
    return ContextView(c, up, c.hourly_cost * up / 3600, stops_at, grace, holders, queries)


@dataclass(frozen=True)
class LeaseView:
    lease: LeaseRecord
    owner: str
    held_seconds: float
    waited_seconds: float
    cost: float | None

    @property
    def live(self) -> bool:
        return not self.lease.state.is_terminal


def lease_view(
    lease: LeaseRecord, owners: dict[str, str], now: datetime, hourly: float | None
) -> LeaseView:
    end = lease.ended_at or now
    held_from = lease.activated_at or end
    held = max(0.0, (end - held_from).total_seconds())
    waited = max(0.0, (held_from - lease.created_at).total_seconds())
    cost = None if hourly is None else (held + waited) * hourly / 3600
    return LeaseView(lease, owners.get(lease.token_id, "?"), held, waited, cost)


# -- the per-app object ------------------------------------------------------------------------


class Dashboard:
    def __init__(self, service: Service, signer: SessionSigner, ledger: InstanceLedger) -> None:
        self.service = service
        self.signer = signer
        self.ledger = ledger
        self.env = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            dur=fmt_duration, money=fmt_money, ts=fmt_time, iso=iso, holder=holder_text
        )
        self.env.globals.update(
            quote=quote,
            urlencode=urlencode,
            ContextState=ContextState,
            LeaseState=LeaseState,
            StopKind=StopKind,
            up_states=[s.value for s in UP_STATES],
            stop_kinds=STOP_KINDS,
        )

    async def principal(self, token_id: str) -> Principal | None:
        """The session's token, re-read at most every ``token_cache_s`` (revocation)."""
        return await self.service.principals.by_token_id(token_id)

    def render(
        self,
        request: Request,
        template: str,
        *,
        viewer: Viewer | None = None,
        status: int = 200,
        **values: Any,
    ) -> HTMLResponse:
        tmpl = self.env.get_template(template)
        now = self.service.clock.now()
        context = {
            "request": request,
            "viewer": viewer,
            "csrf": viewer.csrf if viewer else "",
            "now": now,
            "path": request.url.path,
            "full_path": request.url.path + (f"?{request.url.query}" if request.url.query else ""),
            "credentials": self._credentials() if viewer else None,
            **values,
        }
        if request.headers.get(FRAGMENT_HEADER) == "1" and "live" in tmpl.blocks:
            html = "".join(tmpl.blocks["live"](tmpl.new_context(context)))
        else:
            html = tmpl.render(context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def _credentials(self) -> CredentialStatus | None:
        credentials = self.service.credentials
        return credentials.status() if credentials is not None else None

    def profile(self, name: str) -> Profile | None:
        return self.service.settings.profiles.get(name)


async def dash_of(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


DashDep = Annotated[Dashboard, Depends(dash_of)]


async def viewer_of(request: Request, dash: DashDep) -> Viewer:
    session = dash.signer.read(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInRequired("sign in with a pclease token to see the dashboard")
    principal = await dash.principal(session.token_id)
    if principal is None:
        raise SignInRequired("your token was revoked or removed; sign in with another one")
    if not principal.can_read_all:
        raise SignInRequired("your token has neither the read nor the admin scope")
    return Viewer(principal, session, dash.signer.csrf_token(session))


ViewerDep = Annotated[Viewer, Depends(viewer_of)]


def checked_id(value: str, what: str) -> str:
    if not _ID.match(value):
        shown = value[:36] + ("..." if len(value) > 36 else "")
        raise PageError(404, f"No such {what}", f"There is no {what} {shown!r}.")
    return value


def set_cookie(request: Request, response: Response, name: str, value: str, **kw: Any) -> None:
    response.set_cookie(
        name,
        value,
        httponly=True,
        secure=request.url.scheme == "https",
        **kw,
    )
