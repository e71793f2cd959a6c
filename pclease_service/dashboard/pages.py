"""The dashboard's pages, and the probe that tells their script when to refresh.

Pages render whole on a normal request; with ``X-Pclease-Fragment: 1`` they render only
their live part, which ``static/dashboard.js`` fetches when ``/ui/api/version`` (the newest
event id) changes, and every 10 s regardless. Countdowns, uptimes and running costs tick
in the browser from timestamps, so nothing needs a request every second.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from pclease_service.dashboard import charts
from pclease_service.dashboard.render import (
    DashDep,
    ViewerDep,
    checked_id,
    context_view,
    lease_view,
)
from pclease_service.db.tx import Tx
from pclease_service.errors import PageError
from pclease_service.quotas import QuotaBook, TokenUsage, usage_by_name
from pclease_service.states import LIVE_CONTEXT_STATES, ContextState
from pclease_service.store import contexts, leases, queries, reads, tokens
from pclease_service.store.contexts import ContextRecord
from pclease_service.text import Text

PAGE_SIZE = 50
QUERY_LIMIT = 50
_WINDOWS = {"1h": timedelta(hours=1), "6h": timedelta(hours=6), "24h": timedelta(hours=24)}
_STATE_FILTERS = ("live", "ended", *(s.value for s in ContextState))

router = APIRouter(prefix="/ui", include_in_schema=False)

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
    checked_id(context_id, "context")

    def read(tx: Tx) -> dict[str, Any] | None:
        context = contexts.get_context(tx, context_id)
        if context is None:
            return None
        page_leases, total = reads.lease_page(
            tx, context_id=context_id, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
        return {
            "context": context,
            "leases": page_leases,
            "total": total,
            "owners": tokens.token_names(tx, [x.token_id for x in page_leases]),
            "events": reads.event_page(tx, context_id=context_id, limit=200),
            "queries": queries.list_queries(tx, context_id=context_id, limit=QUERY_LIMIT),
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
    checked_id(lease_id, "lease")

    def read(tx: Tx) -> dict[str, Any] | None:
        lease = leases.get_lease(tx, lease_id)
        if lease is None:
            return None
        return {
            "lease": lease,
            "context": contexts.get_context(tx, lease.context_id),
            "owners": tokens.token_names(tx, [lease.token_id]),
            "events": reads.event_page(tx, lease_id=lease_id, limit=200),
            "queries": queries.list_queries(tx, lease_id=lease_id, limit=QUERY_LIMIT),
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
            "owners": tokens.token_names(tx, [x.token_id for x in found]),
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


# -- usage per token ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Use:
    """One number of a token's usage beside its limit (None: no limit)."""

    used: float
    limit: float | None = None

    @property
    def over(self) -> bool:
        return self.limit is not None and self.used >= self.limit


@dataclass(frozen=True)
class ProfileUse:
    profile: str
    contexts: Use
    cost: Use
    hard_budget: bool


@dataclass(frozen=True)
class TokenUse:
    token: str
    leases: Use
    hours: Use
    profiles: list[ProfileUse]


def token_uses(usage: dict[str, TokenUsage], book: QuotaBook) -> list[TokenUse]:
    """A row per token that uses something or has quota entry, with its limits."""
    rows = []
    for name in sorted(set(usage) | set(book.settings.tokens)):
        used = usage.get(name, TokenUsage())
        quota = book.for_token(name)
        names = sorted(set(used.live_contexts) | set(used.cost_this_month) | set(quota.profiles))
        profiles = []
        for profile in names:
            limits = quota.profiles.get(profile)
            profiles.append(
                ProfileUse(
                    profile,
                    Use(
                        used.live_contexts.get(profile, 0),
                        limits.max_live_contexts if limits else None,
                    ),
                    Use(
                        used.cost_this_month.get(profile, 0.0),
                        limits.monthly_budget if limits else None,
                    ),
                    limits.monthly_budget_hard if limits else True,
                )
            )
        rows.append(
            TokenUse(
                name,
                Use(used.live_leases, quota.max_live_leases),
                Use(used.instance_hours_today, quota.max_instance_hours_per_day),
                profiles,
            )
        )
    return rows


@router.get("/usage")
async def usage(request: Request, dash: DashDep, viewer: ViewerDep) -> Response:
    found = await dash.service.db.read(usage_by_name)
    return dash.render(
        request,
        "usage.html",
        viewer=viewer,
        tokens=token_uses(found, dash.service.quotas),
        nav="usage",
    )
