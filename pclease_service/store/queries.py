"""Query rows: submission, the runner's guarded transitions, cancellation flags."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, insert, select, update

from pclease_service.db.schema import queries
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
    error_type: str | None
    error_message: str | None
    runner_replica: str | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> QueryRecord:
        m = dict(row._mapping)
        m["state"] = QueryState(m["state"])
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
) -> QueryRecord:
    row = tx.conn.execute(
        insert(queries)
        .values(
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
        )
        .returning(*queries.c)
    ).one()
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
    return QueryRecord.from_row(row)


def get_query(tx: Tx, query_id: str) -> QueryRecord | None:
    row = tx.conn.execute(select(queries).where(queries.c.id == query_id)).one_or_none()
    return None if row is None else QueryRecord.from_row(row)


def list_queries(
    tx: Tx,
    *,
    lease_id: str | None = None,
    context_id: str | None = None,
    states: Iterable[QueryState] | None = None,
    limit: int = 500,
) -> list[QueryRecord]:
    stmt = select(queries).order_by(queries.c.created_at.desc()).limit(limit)
    if lease_id is not None:
        stmt = stmt.where(queries.c.lease_id == lease_id)
    if context_id is not None:
        stmt = stmt.where(queries.c.context_id == context_id)
    if states is not None:
        stmt = stmt.where(queries.c.state.in_([s.value for s in states]))
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
