"""Query rows: submission, the runner's guarded transitions, cancellation flags."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, and_, case, func, insert, or_, select, update

from pclease_service.db.schema import contexts, leases, queries
from pclease_service.db.tx import Tx
from pclease_service.states import LIVE_QUERY_STATES, QueryState, query_sources
from pclease_service.store.events import record_event
from pclease_service.store.transitions import guarded_transition


@dataclass(frozen=True)
class QueryRecord:
    id: str
    lease_id: str
    context_id: str
    token_id: str
    state: QueryState
    target: str
    destination: str | None
    engine: str
    labels: Mapping[str, str]
    client_polars_version: str
    plan_bytes: int
    timeout_s: float
    cancel_requested: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    rows: int | None
    result_bytes: int | None
    output: str | None
    #: Lineage: the paths the plan scans and the sinks it writes (empty on rows from
    #: before revision 0006).
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    error_type: str | None
    error_message: str | None
    #: The distributed settings it runs with (``DistributedSettings`` as JSON); None: one node.
    distributed: Mapping[str, Any] | None = None
    #: While queued: 1 for the next query its context runs, 2 for the one after, ...
    queue_position: int | None = None
    runner_replica: str | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> QueryRecord:
        return cls.from_row_mapping(dict(row._mapping))

    @classmethod
    def from_row_mapping(cls, m: dict[str, Any]) -> QueryRecord:
        m["state"] = QueryState(m["state"])
        m["inputs"] = tuple(str(path) for path in m["inputs"] or ())
        m["outputs"] = tuple(str(path) for path in m["outputs"] or ())
        return cls(**m)


def insert_query(
    tx: Tx,
    *,
    query_id: str,
    lease_id: str,
    context_id: str,
    token_id: str,
    target: str,
    destination: str | None,
    engine: str,
    labels: Mapping[str, str],
    client_polars_version: str,
    plan_bytes: int,
    timeout_s: float,
    actor: str,
    distributed: Mapping[str, Any] | None = None,
    inputs: Sequence[str] = (),
    outputs: Sequence[str] = (),
) -> QueryRecord:
    tx.conn.execute(
        insert(queries).values(
            id=query_id,
            lease_id=lease_id,
            context_id=context_id,
            token_id=token_id,
            state=QueryState.QUEUED.value,
            target=target,
            destination=destination,
            engine=engine,
            labels=dict(labels),
            client_polars_version=client_polars_version,
            plan_bytes=plan_bytes,
            timeout_s=timeout_s,
            cancel_requested=0,
            created_at=tx.now,
            distributed=dict(distributed) if distributed is not None else None,
            inputs=list(inputs),
            outputs=list(outputs),
        )
    )
    record_event(
        tx,
        kind="query",
        actor=actor,
        context_id=context_id,
        lease_id=lease_id,
        query_id=query_id,
        to_state=QueryState.QUEUED.value,
        reason=f"{target} query submitted ({plan_bytes} plan bytes)",
    )
    tx.queries_changed.add(query_id)
    inserted = get_query(tx, query_id)
    assert inserted is not None
    return inserted


def _queue_position() -> Any:
    """A query's place in its context's queue (1 = next), computed where it is read: the
    queued queries of the same context submitted before it, plus one. Ties on
    ``created_at`` are broken by id, as the runner breaks them."""
    ahead = queries.alias("ahead")
    count = (
        select(func.count())
        .where(
            ahead.c.context_id == queries.c.context_id,
            ahead.c.state == QueryState.QUEUED.value,
            or_(
                ahead.c.created_at < queries.c.created_at,
                and_(ahead.c.created_at == queries.c.created_at, ahead.c.id <= queries.c.id),
            ),
        )
        .scalar_subquery()
    )
    return case((queries.c.state == QueryState.QUEUED.value, count), else_=None).label(
        "queue_position"
    )


def _read() -> Any:
    return select(queries, _queue_position())


def get_query(tx: Tx, query_id: str) -> QueryRecord | None:
    row = tx.conn.execute(_read().where(queries.c.id == query_id)).one_or_none()
    return None if row is None else QueryRecord.from_row(row)


def list_queries(
    tx: Tx,
    *,
    lease_id: str | None = None,
    context_id: str | None = None,
    states: Iterable[QueryState] | None = None,
    limit: int = 500,
) -> list[QueryRecord]:
    stmt = _read().order_by(queries.c.created_at.desc(), queries.c.id.desc()).limit(limit)
    if lease_id is not None:
        stmt = stmt.where(queries.c.lease_id == lease_id)
    if context_id is not None:
        stmt = stmt.where(queries.c.context_id == context_id)
    if states is not None:
        stmt = stmt.where(queries.c.state.in_([s.value for s in states]))
    return [QueryRecord.from_row(r) for r in tx.conn.execute(stmt)]


@dataclass(frozen=True)
class Placed:
    """A live query and where it would run: its lease's state and profile, its
    context's state and backend handle."""

    query: QueryRecord
    lease_state: str
    profile: str
    context_state: str
    handle: Mapping[str, Any] | None


def live_placed(tx: Tx, *, limit: int = 10_000) -> list[Placed]:
    """The live queries, newest first, each with its lease and context, in one read (the
    query runner takes this snapshot on every tick)."""
    extra = (
        leases.c.state.label("placed_lease_state"),
        leases.c.profile.label("placed_profile"),
        contexts.c.state.label("placed_context_state"),
        contexts.c.backend_handle.label("placed_handle"),
    )
    stmt = (
        select(queries, *extra)
        .join(leases, leases.c.id == queries.c.lease_id)
        .join(contexts, contexts.c.id == queries.c.context_id)
        .where(queries.c.state.in_([s.value for s in LIVE_QUERY_STATES]))
        .order_by(queries.c.created_at.desc(), queries.c.id.desc())
        .limit(limit)
    )
    placed = []
    for row in tx.conn.execute(stmt):
        m = dict(row._mapping)
        where = {c.name: m.pop(c.name) for c in extra}
        placed.append(
            Placed(
                QueryRecord.from_row_mapping(m),
                where["placed_lease_state"],
                where["placed_profile"],
                where["placed_context_state"],
                where["placed_handle"],
            )
        )
    return placed


def orphaned_queries(tx: Tx, *, alive: set[str]) -> list[QueryRecord]:
    """Running queries whose runner is not one of the ``alive`` replicas."""
    stmt = select(queries).where(
        queries.c.state == QueryState.RUNNING.value,
        or_(queries.c.runner_replica.is_(None), queries.c.runner_replica.not_in(alive)),
    )
    return [QueryRecord.from_row(r) for r in tx.conn.execute(stmt)]


def transition_query(
    tx: Tx,
    query_id: str,
    to: QueryState,
    *,
    actor: str,
    reason: str,
    sources: Iterable[QueryState] | None = None,
    values: Mapping[str, Any] | None = None,
) -> QueryRecord | None:
    row = guarded_transition(
        tx,
        queries,
        query_id,
        query_sources(to),
        to,
        actor=actor,
        reason=reason,
        only_from=sources,
        values=values,
    )
    return None if row is None else QueryRecord.from_row(row)


def start_query(
    tx: Tx, query_id: str, *, limit: int, actor: str, replica: str
) -> QueryRecord | None:
    """Move a queued query to ``running`` if its context runs fewer than ``limit`` queries
    (its profile's ``concurrent_queries``), as sent by ``replica``'s runner; None if it is
    not queued or the context is full.

    The context's row is locked first, so two runners (replicas) counting at once cannot
    both take its last slot."""
    context_id = tx.conn.execute(
        select(queries.c.context_id).where(queries.c.id == query_id)
    ).scalar()
    if context_id is None:
        return None
    tx.conn.execute(select(contexts.c.id).where(contexts.c.id == context_id).with_for_update())
    running = queries.alias("running")
    busy = (
        select(func.count())
        .where(
            running.c.context_id == context_id,
            running.c.state == QueryState.RUNNING.value,
        )
        .scalar_subquery()
    )
    row = guarded_transition(
        tx,
        queries,
        query_id,
        query_sources(QueryState.RUNNING),
        QueryState.RUNNING,
        actor=actor,
        reason=f"sent to its context by replica {replica}",
        only_from=[QueryState.QUEUED],
        where=[busy < limit],
        values={"started_at": tx.now, "runner_replica": replica},
    )
    return None if row is None else QueryRecord.from_row(row)


def request_query_cancel(tx: Tx, query_id: str, *, actor: str, reason: str) -> None:
    """A queued query is cancelled at once; a running one is flagged for its runner."""
    cancelled = transition_query(
        tx,
        query_id,
        QueryState.CANCELLED,
        actor=actor,
        reason=reason,
        sources=[QueryState.QUEUED],
        values={"finished_at": tx.now, "error_type": "Cancelled", "error_message": reason},
    )
    if cancelled is None:
        result = tx.conn.execute(
            update(queries)
            .where(
                queries.c.id == query_id,
                queries.c.state == QueryState.RUNNING.value,
                queries.c.cancel_requested == 0,
            )
            .values(cancel_requested=1, error_message=reason)
        )
        if result.rowcount:
            tx.queries_changed.add(query_id)


def cancel_lease_queries(tx: Tx, lease_id: str, *, actor: str, reason: str) -> None:
    live = (
        tx.conn.execute(
            select(queries.c.id).where(
                queries.c.lease_id == lease_id,
                queries.c.state.in_([s.value for s in LIVE_QUERY_STATES]),
            )
        )
        .scalars()
        .all()
    )
    for query_id in live:
        request_query_cancel(tx, query_id, actor=actor, reason=reason)
