"""The event log: every transition (and a few notes) with its actor and reason."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select

from pclease_service.db.schema import events
from pclease_service.db.tx import Tx


@dataclass(frozen=True)
class EventRecord:
    id: int
    at: datetime
    kind: str
    context_id: str | None
    lease_id: str | None
    from_state: str | None
    to_state: str | None
    actor: str
    reason: str
    query_id: str | None = None


def record_event(
    tx: Tx,
    *,
    kind: str,
    actor: str,
    reason: str,
    context_id: str | None = None,
    lease_id: str | None = None,
    query_id: str | None = None,
    from_state: str | None = None,
    to_state: str | None = None,
) -> None:
    tx.conn.execute(
        insert(events).values(
            at=tx.now,
            kind=kind,
            context_id=context_id,
            lease_id=lease_id,
            query_id=query_id,
            from_state=from_state,
            to_state=to_state,
            actor=actor[:120],
            reason=reason,
        )
    )


def list_events(
    tx: Tx,
    *,
    context_id: str | None = None,
    lease_id: str | None = None,
    after_id: int | None = None,
    limit: int = 200,
) -> list[EventRecord]:
    stmt = select(events).order_by(events.c.id.desc()).limit(limit)
    if context_id is not None:
        stmt = stmt.where(events.c.context_id == context_id)
    if lease_id is not None:
        stmt = stmt.where(events.c.lease_id == lease_id)
    if after_id is not None:
        stmt = stmt.where(events.c.id > after_id)
    return [EventRecord(**dict(r._mapping)) for r in tx.conn.execute(stmt)]
