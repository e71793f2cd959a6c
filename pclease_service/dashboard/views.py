"""The dashboard's routes: server-rendered pages, two admin actions, one live-update probe.

Pages render whole on a normal request; with ``X-Pclease-Fragment: 1`` they render only
their live part, which ``static/dashboard.js`` fetches when ``/ui/api/version`` (the newest
event id) changes, and every 10 s regardless. Countdowns, uptimes and running costs tick
in the browser from timestamps, so nothing needs a request every second.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape

from pclease_service import store, tokens
from pclease_service.config import Profile
from pclease_service.dashboard import charts, reads
from pclease_service.dashboard.sessions import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    Session,
    SessionSigner,
    new_login_nonce,
    safe_next,
)
from pclease_service.errors import ContextNotFound, IllegalTransition
from pclease_service.leases import Principal, force_stop_context
from pclease_service.metrics import InstanceLedger
from pclease_service.runtime import Service
from pclease_service.states import LIVE_CONTEXT_STATES, ContextState, LeaseState
from pclease_service.store import ContextRecord, LeaseRecord, Tx
from pclease_service.text import Text

HERE = Path(__file__).parent
PAGE_SIZE = 50
QUERY_LIMIT = 50
_ID = re.compile(r"^[0-9a-fA-F-]{1,36}$")
_WINDOWS = {"1h": timedelta(hours=1), "6h": timedelta(hours=6), "24h": timedelta(hours=24)}
_STATE_FILTERS = ("live", "ended", *(s.value for s in ContextState))
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


class PageError(Exception):
    """Shown as an HTML page with this status, title and advice."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title
        self.message = message


class SignInRequired(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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
    stops_at = None
    grace = profile.idle_grace_s if profile else None
    if c.state is ContextState.IDLE and c.idle_since is not None:
        stops_at = c.idle_since + timedelta(seconds=grace or 0.0)
        if profile is not None and profile.max_lifetime_s is not None:
            stops_at = min(stops_at, c.created_at + timedelta(seconds=profile.max_lifetime_s))
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
            quote=quote, urlencode=urlencode, ContextState=ContextState, LeaseState=LeaseState
        )
        self._principals: dict[str, tuple[float, Principal | None]] = {}

    async def principal(self, token_id: str) -> Principal | None:
        """The session's token, re-read at most every ``token_cache_s`` (revocation)."""
        ttl = self.service.settings.token_cache_s
        cached = self._principals.get(token_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        record = await self.service.db.read(lambda tx: reads.token_by_id(tx, token_id))
        principal = None
        if record is not None and record.revoked_at is None:
            principal = Principal(record.id, record.name, record.scopes)
        if ttl > 0:
            if len(self._principals) > 10_000:
                self._principals.clear()
            self._principals[token_id] = (time.monotonic() + ttl, principal)
        return principal

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
            "credentials": self.service.credential_status() if viewer else None,
            **values,
        }
        if request.headers.get(FRAGMENT_HEADER) == "1" and "live" in tmpl.blocks:
            html = "".join(tmpl.blocks["live"](tmpl.new_context(context)))
        else:
            html = tmpl.render(context)
        return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)

    def profile(self, name: str) -> Profile | None:
        return self.service.settings.profiles.get(name)


def _dash(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


DashDep = Annotated[Dashboard, Depends(_dash)]


async def _viewer(request: Request, dash: DashDep) -> Viewer:
    session = dash.signer.read(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInRequired("sign in with a pclease token to see the dashboard")
    principal = await dash.principal(session.token_id)
    if principal is None:
        raise SignInRequired("your token was revoked or removed; sign in with another one")
    if not principal.can_read_all:
        raise SignInRequired("your token has neither the read nor the admin scope")
    return Viewer(principal, session, dash.signer.csrf_token(session))


ViewerDep = Annotated[Viewer, Depends(_viewer)]


def _checked_id(value: str, what: str) -> str:
    if not _ID.match(value):
        shown = value[:36] + ("..." if len(value) > 36 else "")
        raise PageError(404, f"No such {what}", f"There is no {what} {shown!r}.")
    return value


def _set_cookie(request: Request, response: Response, name: str, value: str, **kw: Any) -> None:
    response.set_cookie(
        name,
        value,
        httponly=True,
        secure=request.url.scheme == "https",
        **kw,
    )


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
    _set_cookie(
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
    import hmac

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
    token_hash = tokens.hash_token(value)
    record = await dash.service.db.read(lambda tx: store.token_by_hash(tx, token_hash))
    if record is None or record.revoked_at is not None:
        return _login_page(
            request,
            dash,
            next,
            error="That token is unknown or revoked. Create one with "
            "`pclease token create NAME --scope read`.",
            status=401,
        )
    principal = Principal(record.id, record.name, record.scopes)
    if not principal.can_read_all:
        return _login_page(
            request,
            dash,
            next,
            error=f"Token {record.name!r} has only the {', '.join(sorted(record.scopes))} "
            "scope; the dashboard needs read or admin.",
            status=403,
        )
    cookie, _ = dash.signer.issue(record.id)
    response = RedirectResponse(safe_next(next), status_code=303)
    _set_cookie(
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


# -- live updates ------------------------------------------------------------------------------


@router.get("/api/version")
async def version(dash: DashDep, viewer: ViewerDep) -> JSONResponse:
    newest = await dash.service.db.read(reads.max_event_id)
    return JSONResponse(
        {"version": newest, "now": dash.service.clock.now().isoformat()},
        headers={"Cache-Control": "no-store"},
    )


# -- pages -------------------------------------------------------------------------------------


@router.get("/")
async def overview(
    request: Request,
    dash: DashDep,
    viewer: ViewerDep,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    state: Annotated[str, Query(max_length=16)] = "live",
    profile: Annotated[Annotated[str, Text(63)] | None, Query()] = None,
    window: Annotated[str, Query(max_length=4)] = "1h",
) -> Response:
    profile = profile or None
    if state not in _STATE_FILTERS:
        raise PageError(
            422, "Bad request", f"state must be one of: {', '.join(_STATE_FILTERS)} (got {state!r})"
        )
    if window not in _WINDOWS:
        raise PageError(
            422, "Bad request", f"window must be one of: {', '.join(_WINDOWS)} (got {window!r})"
        )
    if state == "live":
        states = [s.value for s in LIVE_CONTEXT_STATES]
    elif state == "ended":
        states = [ContextState.STOPPED.value, ContextState.FAILED.value]
    else:
        states = [state]

    def read(tx: Tx) -> dict[str, Any]:
        dash.ledger.catch_up(tx)
        rows, total = reads.context_page(
            tx,
            states=states,
            profile=profile,
            offset=(page - 1) * PAGE_SIZE,
            limit=PAGE_SIZE,
        )
        holders = reads.live_leases_of(tx, [c.id for c in rows])
        return {
            "queries": reads.query_counts(tx, [c.id for c in rows]),
            "rows": rows,
            "total": total,
            "holders": holders,
            "totals": reads.totals(tx),
            "events": reads.event_page(tx, limit=12),
            "now": tx.now,
        }

    data = await dash.service.db.read(read)
    now = data["now"]
    span = _WINDOWS[window]
    usage = charts.usage_chart(dash.ledger.intervals(now - span), now, span)
    views = [
        context_view(
            c,
            dash.profile(c.profile),
            now,
            data["holders"].get(c.id, []),
            data["queries"].get(c.id, 0),
        )
        for c in data["rows"]
    ]
    pages = max(1, -(-data["total"] // PAGE_SIZE))
    return dash.render(
        request,
        "overview.html",
        viewer=viewer,
        contexts=views,
        total=data["total"],
        page=page,
        pages=pages,
        state=state,
        profile=profile,
        window=window,
        windows=list(_WINDOWS),
        state_filters=_STATE_FILTERS,
        profiles=sorted(dash.service.settings.profiles),
        totals=data["totals"],
        usage=usage,
        events=data["events"],
        nav="overview",
    )


@router.get("/contexts/{context_id}")
async def context_page(
    request: Request,
    context_id: str,
    dash: DashDep,
    viewer: ViewerDep,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
    done: Annotated[str, Query(max_length=20)] = "",
) -> Response:
    _checked_id(context_id, "context")

    def read(tx: Tx) -> dict[str, Any] | None:
        context = store.get_context(tx, context_id)
        if context is None:
            return None
        page_leases, total = reads.lease_page(
            tx, context_id=context_id, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
        return {
            "context": context,
            "leases": page_leases,
            "total": total,
            "owners": store.token_names(tx, [x.token_id for x in page_leases]),
            "events": reads.event_page(tx, context_id=context_id, limit=200),
            "queries": store.list_queries(tx, context_id=context_id, limit=QUERY_LIMIT),
            "query_count": reads.query_counts(tx, [context_id]).get(context_id, 0),
            "now": tx.now,
        }

    data = await dash.service.db.read(read)
    if data is None:
        raise PageError(404, "No such context", f"There is no context {context_id!r}.")
    context: ContextRecord = data["context"]
    now = data["now"]
    live = [x for x in data["leases"] if not x.state.is_terminal]
    view = context_view(context, dash.profile(context.profile), now, live, data["query_count"])
    return dash.render(
        request,
        "context.html",
        viewer=viewer,
        cv=view,
        leases=[lease_view(x, data["owners"], now, None) for x in data["leases"]],
        total=data["total"],
        page=page,
        pages=max(1, -(-data["total"] // PAGE_SIZE)),
        events=data["events"],
        queries=data["queries"],
        done=done,
        nav="overview",
    )


@router.get("/leases/{lease_id}")
async def lease_page(
    request: Request,
    lease_id: str,
    dash: DashDep,
    viewer: ViewerDep,
    done: Annotated[str, Query(max_length=20)] = "",
) -> Response:
    _checked_id(lease_id, "lease")

    def read(tx: Tx) -> dict[str, Any] | None:
        lease = store.get_lease(tx, lease_id)
        if lease is None:
            return None
        return {
            "lease": lease,
            "context": store.get_context(tx, lease.context_id),
            "owners": store.token_names(tx, [lease.token_id]),
            "events": reads.event_page(tx, lease_id=lease_id, limit=200),
            "queries": store.list_queries(tx, lease_id=lease_id, limit=QUERY_LIMIT),
            "now": tx.now,
        }

    data = await dash.service.db.read(read)
    if data is None:
        raise PageError(404, "No such lease", f"There is no lease {lease_id!r}.")
    context: ContextRecord | None = data["context"]
    hourly = context.hourly_cost if context else None
    lv = lease_view(data["lease"], data["owners"], data["now"], hourly)
    extra = {
        k: v for k, v in data["lease"].holder.items() if k not in ("dag_id", "run_id", "task_id")
    }
    return dash.render(
        request,
        "lease.html",
        viewer=viewer,
        lv=lv,
        context=context,
        extra=extra,
        events=data["events"],
        queries=data["queries"],
        done=done,
        nav="overview",
    )


@router.get("/runs")
async def runs(
    request: Request,
    dash: DashDep,
    viewer: ViewerDep,
    dag_id: Annotated[Annotated[str, Text(250)] | None, Query()] = None,
    run_id: Annotated[Annotated[str, Text(250)] | None, Query()] = None,
) -> Response:
    if run_id is not None and dag_id is None:
        raise PageError(422, "Bad request", "Give dag_id together with run_id.")
    if dag_id is None or run_id is None:
        rows = await dash.service.db.read(
            lambda tx: reads.recent_runs(tx, dag_id=dag_id, limit=200)
        )
        return dash.render(
            request, "runs.html", viewer=viewer, runs=rows, dag_id=dag_id, nav="runs"
        )

    def read(tx: Tx) -> dict[str, Any]:
        found = reads.run_leases(tx, dag_id=dag_id, run_id=run_id, limit=1000)
        return {
            "leases": found,
            "contexts": reads.contexts_by_id(tx, [x.context_id for x in found]),
            "owners": store.token_names(tx, [x.token_id for x in found]),
            "now": tx.now,
        }

    data = await dash.service.db.read(read)
    now = data["now"]
    contexts: dict[str, ContextRecord] = data["contexts"]
    views = [
        lease_view(
            x,
            data["owners"],
            now,
            contexts[x.context_id].hourly_cost if x.context_id in contexts else None,
        )
        for x in data["leases"]
    ]
    return dash.render(
        request,
        "run.html",
        viewer=viewer,
        dag_id=dag_id,
        run_id=run_id,
        leases=views,
        contexts=sorted(contexts.values(), key=lambda c: c.created_at),
        held=sum(v.held_seconds for v in views),
        waited=sum(v.waited_seconds for v in views),
        cost=sum(v.cost or 0.0 for v in views),
        live=sum(1 for v in views if v.live),
        timeline=charts.run_timeline(data["leases"][:200], now),
        nav="runs",
    )


@router.get("/events")
async def events_page(
    request: Request,
    dash: DashDep,
    viewer: ViewerDep,
    before: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    kind: Annotated[str | None, Query(max_length=16)] = None,
) -> Response:
    kind = kind or None
    if kind not in (None, "context", "lease", "query"):
        raise PageError(422, "Bad request", f"kind must be context, lease or query (got {kind!r})")
    found = await dash.service.db.read(
        lambda tx: reads.event_page(tx, before_id=before, kind=kind, limit=100)
    )
    return dash.render(
        request,
        "events.html",
        viewer=viewer,
        events=found,
        kind=kind,
        before=before,
        older=found[-1].id if len(found) == 100 else None,
        nav="events",
    )


# -- admin actions -----------------------------------------------------------------------------


def _authorise(dash: Dashboard, viewer: Viewer, csrf: str, what: str) -> None:
    if not dash.signer.check_csrf(viewer.session, csrf):
        raise PageError(
            403,
            "Form expired",
            "The form was not sent from this dashboard or your session changed (CSRF check "
            "failed). Reload the page and try again.",
        )
    if not viewer.principal.is_admin:
        raise PageError(
            403,
            "Admin only",
            f"To {what} you need a token with the admin scope; you are signed in as "
            f"{viewer.principal.name!r} with the read scope.",
        )


@router.post("/contexts/{context_id}/stop")
async def stop_context(
    request: Request,
    context_id: str,
    dash: DashDep,
    viewer: ViewerDep,
    csrf: Annotated[str, Form(max_length=200)] = "",
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    _checked_id(context_id, "context")
    _authorise(dash, viewer, csrf, "force-stop a context")
    context = await dash.service.db.read(lambda tx: store.get_context(tx, context_id))
    if context is None:
        raise PageError(404, "No such context", f"There is no context {context_id!r}.")
    if confirm != "yes":
        return dash.render(
            request,
            "confirm.html",
            viewer=viewer,
            action=f"/ui/contexts/{context_id}/stop",
            back=f"/ui/contexts/{context_id}",
            title=f"Force-stop context {context_id[:8]}?",
            detail=f"This revokes its {context.refcount} live lease(s) now; their tasks will "
            "fail their next heartbeat. The instance stops right after.",
            button="Force-stop",
        )
    svc = dash.service
    try:
        await force_stop_context(svc.db, svc.notifier, viewer.principal, context_id)
    except ContextNotFound:
        raise PageError(404, "No such context", f"There is no context {context_id!r}.") from None
    except IllegalTransition as exc:
        raise PageError(409, "Nothing to stop", exc.message) from None
    return RedirectResponse(f"/ui/contexts/{context_id}?done=stopped", status_code=303)


@router.post("/leases/{lease_id}/revoke")
async def revoke_lease(
    request: Request,
    lease_id: str,
    dash: DashDep,
    viewer: ViewerDep,
    csrf: Annotated[str, Form(max_length=200)] = "",
    confirm: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    _checked_id(lease_id, "lease")
    _authorise(dash, viewer, csrf, "revoke a lease")
    lease = await dash.service.db.read(lambda tx: store.get_lease(tx, lease_id))
    if lease is None:
        raise PageError(404, "No such lease", f"There is no lease {lease_id!r}.")
    if lease.state.is_terminal:
        raise PageError(
            409, "Lease already ended", f"Lease {lease_id} is {lease.state.value}; nothing to do."
        )
    if confirm != "yes":
        return dash.render(
            request,
            "confirm.html",
            viewer=viewer,
            action=f"/ui/leases/{lease_id}/revoke",
            back=f"/ui/leases/{lease_id}",
            title=f"Revoke lease {lease_id[:8]}?",
            detail=f"Held by {holder_text(lease)}. Its task loses the compute at its next "
            "heartbeat.",
            button="Revoke",
        )
    actor = viewer.principal.actor
    ended = await dash.service.db.write(
        lambda tx: store.end_lease(
            tx, lease_id, LeaseState.REVOKED, actor=actor, reason=f"revoked by {actor}"
        )
    )
    if ended is None:
        raise PageError(409, "Lease already ended", f"Lease {lease_id} ended meanwhile.")
    return RedirectResponse(f"/ui/leases/{lease_id}?done=revoked", status_code=303)
