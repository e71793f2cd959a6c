"""Read-only queries of the dashboard and of ``/metrics``: pages, counts and aggregates.

Every write still goes through :mod:`service.store`; these only read, each one bounded by
a ``LIMIT`` or an aggregate so a page stays fast with thousands of rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import ColumnElement, and_, case, func, literal, or_, select

from pclease_service.db.schema import contexts, events, leases, queries, tokens
from pclease_service.states import (
    LIVE_CONTEXT_STATES,
    LIVE_LEASE_STATES,
    ContextState,
    LeaseState,
    QueryState,
)
from pclease_service.store import ContextRecord, EventRecord, LeaseRecord, TokenRecord, Tx

_LIVE_CONTEXTS = [s.value for s in LIVE_CONTEXT_STATES]
_LIVE_LEASES = [s.value for s in LIVE_LEASE_STATES]


# -- metrics ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LedgerEvent:
    id: int
    at: datetime
    context_id: str | None
    to_state: str | None
    profile: str | None
    hourly_cost: float


def events_for_ledger(
    tx: Tx, after_id: int, also_ids: Sequence[int], limit: int
) -> list[LedgerEvent]:
    """Events after ``after_id`` (plus ``also_ids``), in id order; context transitions
    carry their context's profile and hourly cost, other events only their id."""
    is_transition = and_(events.c.kind == "context", events.c.to_state.is_not(None))
    wanted = events.c.id > after_id
    if also_ids:
        wanted = or_(wanted, events.c.id.in_(list(also_ids)[:1000]))
    rows = tx.conn.execute(
        select(
            events.c.id,
            events.c.at,
            events.c.context_id,
            events.c.to_state,
            contexts.c.profile,
            contexts.c.hourly_cost,
        )
        .select_from(
            events.outerjoin(contexts, and_(is_transition, contexts.c.id == events.c.context_id))
        )
        .where(wanted)
        .order_by(events.c.id)
        .limit(limit)
    )
    return [
        LedgerEvent(
            r.id,
            r.at,
            r.context_id if r.profile is not None else None,
            r.to_state if r.profile is not None else None,
            r.profile,
            float(r.hourly_cost or 0.0),
        )
        for r in rows
    ]


_STOP_REASON = case(
    (contexts.c.state == ContextState.FAILED.value, literal("failed")),
    (contexts.c.stop_reason.like("idle for%"), literal("idle")),
    (contexts.c.stop_reason.like("idle past%"), literal("max_lifetime")),
    (contexts.c.stop_reason.like("force-stopped%"), literal("forced")),
    (contexts.c.stop_reason.like("%shutting down%"), literal("shutdown")),
    (contexts.c.stop_reason.like("%no longer configured%"), literal("unconfigured")),
    else_=literal("other"),
)


@dataclass(frozen=True)
class MetricsSnapshot:
    contexts: dict[tuple[str, str], int]
    leases: dict[tuple[str, str], int]
    starts: dict[str, int]
    stops: dict[tuple[str, str], int]
    query_outcomes: dict[str, int] = field(default_factory=dict)

    def profiles(self) -> set[str]:
        return {p for p, _ in self.contexts} | {p for p, _ in self.leases}


def metrics_snapshot(tx: Tx) -> MetricsSnapshot:
    by_state = {
        (r.profile, r.state): int(r.n)
        for r in tx.conn.execute(
            select(contexts.c.profile, contexts.c.state, func.count().label("n")).group_by(
                contexts.c.profile, contexts.c.state
            )
        )
    }
    starts: dict[str, int] = {}
    for (profile, _), n in by_state.items():
        starts[profile] = starts.get(profile, 0) + n
    reason = _STOP_REASON.label("reason")
    stops = {
        (r.profile, r.reason): int(r.n)
        for r in tx.conn.execute(
            select(contexts.c.profile, reason, func.count().label("n"))
            .where(contexts.c.state.in_([ContextState.STOPPED.value, ContextState.FAILED.value]))
            .group_by(contexts.c.profile, reason)
        )
    }
    lease_states = {
        (r.profile, r.state): int(r.n)
        for r in tx.conn.execute(
            select(leases.c.profile, leases.c.state, func.count().label("n")).group_by(
                leases.c.profile, leases.c.state
            )
        )
    }
    outcomes = {
        r.state: int(r.n)
        for r in tx.conn.execute(
            select(queries.c.state, func.count().label("n"))
            .where(queries.c.state.in_([s.value for s in QueryState if s.is_terminal]))
            .group_by(queries.c.state)
        )
    }
    return MetricsSnapshot(by_state, lease_states, starts, stops, outcomes)


# -- dashboard ----------------------------------------------------------------------------------


def max_event_id(tx: Tx) -> int:
    return int(tx.conn.execute(select(func.coalesce(func.max(events.c.id), 0))).scalar_one())


def token_by_id(tx: Tx, token_id: str) -> TokenRecord | None:
    row = tx.conn.execute(select(tokens).where(tokens.c.id == token_id)).one_or_none()
    return None if row is None else TokenRecord.from_row(row)


@dataclass(frozen=True)
class Totals:
    """The overview's headline numbers."""

    by_state: dict[str, int]
    live_leases: int
    pending_leases: int
    cost_per_hour: float
    by_profile: dict[str, int] = field(default_factory=dict)

    @property
    def up(self) -> int:
        return sum(self.by_state.values())


def totals(tx: Tx) -> Totals:
    by_state: dict[str, int] = {}
    by_profile: dict[str, int] = {}
    cost = 0.0
    for r in tx.conn.execute(
        select(
            contexts.c.profile,
            contexts.c.state,
            func.count().label("n"),
            func.sum(contexts.c.hourly_cost).label("cost"),
        )
        .where(contexts.c.state.in_(_LIVE_CONTEXTS))
        .group_by(contexts.c.profile, contexts.c.state)
    ):
        by_state[r.state] = by_state.get(r.state, 0) + int(r.n)
        by_profile[r.profile] = by_profile.get(r.profile, 0) + int(r.n)
        cost += float(r.cost or 0.0)
    lease_counts: dict[str, int] = {
        r.state: int(r.n)
        for r in tx.conn.execute(
            select(leases.c.state, func.count().label("n"))
            .where(leases.c.state.in_(_LIVE_LEASES))
            .group_by(leases.c.state)
        )
    }
    return Totals(
        by_state=by_state,
        live_leases=sum(lease_counts.values()),
        pending_leases=lease_counts.get(LeaseState.PENDING.value, 0),
        cost_per_hour=cost,
        by_profile=by_profile,
    )


def context_page(
    tx: Tx,
    *,
    states: Iterable[str],
    profile: str | None,
    offset: int,
    limit: int,
) -> tuple[list[ContextRecord], int]:
    conditions: list[ColumnElement[bool]] = [contexts.c.state.in_(list(states))]
    if profile is not None:
        conditions.append(contexts.c.profile == profile)
    total = int(
        tx.conn.execute(select(func.count()).select_from(contexts).where(*conditions)).scalar_one()
    )
    rows = tx.conn.execute(
        select(contexts)
        .where(*conditions)
        .order_by(contexts.c.created_at.desc(), contexts.c.id)
        .offset(offset)
        .limit(limit)
    )
    return [ContextRecord.from_row(r) for r in rows], total


def live_leases_of(tx: Tx, context_ids: Sequence[str]) -> dict[str, list[LeaseRecord]]:
    """Live leases of the given contexts (for "who holds it"), oldest first."""
    found: dict[str, list[LeaseRecord]] = {cid: [] for cid in context_ids}
    if not context_ids:
        return found
    rows = tx.conn.execute(
        select(leases)
        .where(leases.c.context_id.in_(list(context_ids)), leases.c.state.in_(_LIVE_LEASES))
        .order_by(leases.c.created_at)
    )
    for r in rows:
        lease = LeaseRecord.from_row(r)
        found[lease.context_id].append(lease)
    return found


def lease_page(
    tx: Tx, *, context_id: str, offset: int, limit: int
) -> tuple[list[LeaseRecord], int]:
    """A context's leases, live ones first, then the most recent."""
    total = int(
        tx.conn.execute(
            select(func.count()).select_from(leases).where(leases.c.context_id == context_id)
        ).scalar_one()
    )
    live_first = case((leases.c.state.in_(_LIVE_LEASES), 0), else_=1)
    rows = tx.conn.execute(
        select(leases)
        .where(leases.c.context_id == context_id)
        .order_by(live_first, leases.c.created_at.desc(), leases.c.id)
        .offset(offset)
        .limit(limit)
    )
    return [LeaseRecord.from_row(r) for r in rows], total


def event_page(
    tx: Tx,
    *,
    before_id: int | None = None,
    context_id: str | None = None,
    lease_id: str | None = None,
    kind: str | None = None,
    limit: int = 100,
) -> list[EventRecord]:
    """Events newest first; ``before_id`` pages back."""
    stmt = select(events).order_by(events.c.id.desc()).limit(limit)
    if before_id is not None:
        stmt = stmt.where(events.c.id < before_id)
    if context_id is not None:
        stmt = stmt.where(events.c.context_id == context_id)
    if lease_id is not None:
        stmt = stmt.where(events.c.lease_id == lease_id)
    if kind is not None:
        stmt = stmt.where(events.c.kind == kind)
    return [EventRecord(**dict(r._mapping)) for r in tx.conn.execute(stmt)]


def contexts_by_id(tx: Tx, ids: Iterable[str]) -> dict[str, ContextRecord]:
    wanted = list(set(ids))
    if not wanted:
        return {}
    rows = tx.conn.execute(select(contexts).where(contexts.c.id.in_(wanted)))
    return {r.id: ContextRecord.from_row(r) for r in rows}


@dataclass(frozen=True)
class RunRow:
    dag_id: str
    run_id: str
    leases: int
    live: int
    first_at: datetime
    last_at: datetime


def recent_runs(tx: Tx, *, dag_id: str | None, limit: int) -> list[RunRow]:
    live = func.sum(case((leases.c.state.in_(_LIVE_LEASES), 1), else_=0))
    stmt = (
        select(
            leases.c.dag_id,
            leases.c.run_id,
            func.count().label("n"),
            live.label("live"),
            func.min(leases.c.created_at).label("first_at"),
            func.max(leases.c.created_at).label("last_at"),
        )
        .where(leases.c.dag_id.is_not(None), leases.c.run_id.is_not(None))
        .group_by(leases.c.dag_id, leases.c.run_id)
        .order_by(func.max(leases.c.created_at).desc())
        .limit(limit)
    )
    if dag_id is not None:
        stmt = stmt.where(leases.c.dag_id == dag_id)
    from datetime import UTC

    def aware(value: datetime) -> datetime:  # min()/max() bypass the TypeDecorator
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)

    return [
        RunRow(r.dag_id, r.run_id, int(r.n), int(r.live or 0), aware(r.first_at), aware(r.last_at))
        for r in tx.conn.execute(stmt)
    ]


def run_leases(tx: Tx, *, dag_id: str, run_id: str, limit: int) -> list[LeaseRecord]:
    rows = tx.conn.execute(
        select(leases)
        .where(leases.c.dag_id == dag_id, leases.c.run_id == run_id)
        .order_by(leases.c.created_at, leases.c.id)
        .limit(limit)
    )
    return [LeaseRecord.from_row(r) for r in rows]


def query_counts(tx: Tx, context_ids: Sequence[str]) -> dict[str, int]:
    """Queries run (submitted) per context."""
    if not context_ids:
        return {}
    rows = tx.conn.execute(
        select(queries.c.context_id, func.count().label("n"))
        .where(queries.c.context_id.in_(list(context_ids)))
        .group_by(queries.c.context_id)
    )
    return {r.context_id: int(r.n) for r in rows}
