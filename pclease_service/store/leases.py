"""Lease rows: insertion on a context slot, heartbeats, expiry, and how a lease ends.

A lease that ends gives its slot back to its context (:func:`end_lease`); a lease in any
terminal state cancels its queries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, bindparam, case, func, insert, or_, select, update

from pclease_service.db.schema import leases, queries
from pclease_service.db.tx import Tx
from pclease_service.states import (
    LIVE_LEASE_STATES,
    ContextState,
    LeaseState,
    QueryState,
    lease_sources,
)
from pclease_service.store.contexts import ContextRecord, give_back_slot
from pclease_service.store.events import record_event
from pclease_service.store.queries import cancel_lease_queries
from pclease_service.store.transitions import guarded_transition, new_id


@dataclass(frozen=True)
class LeaseRecord:
    id: str
    profile: str
    context_id: str
    token_id: str
    state: LeaseState
    ttl_s: float
    expires_at: datetime
    heartbeat_at: datetime | None
    created_at: datetime
    activated_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None
    holder: Mapping[str, Any]
    dag_id: str | None
    run_id: str | None
    task_id: str | None
    idempotency_key: str | None
    request_fingerprint: str | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> LeaseRecord:
        m = dict(row._mapping)
        m["state"] = LeaseState(m["state"])
        return cls(**m)


def transition_lease(
    tx: Tx,
    lease_id: str,
    to: LeaseState,
    *,
    actor: str,
    reason: str,
    sources: Iterable[LeaseState] | None = None,
    values: Mapping[str, Any] | None = None,
) -> LeaseRecord | None:
    row = guarded_transition(
        tx,
        leases,
        lease_id,
        lease_sources(to),
        to,
        actor=actor,
        reason=reason,
        only_from=sources,
        values=values,
    )
    if row is None:
        return None
    if to.is_terminal:
        cancel_lease_queries(tx, lease_id, actor=actor, reason=f"its lease was {to.value}")
    return LeaseRecord.from_row(row)


def insert_lease(
    tx: Tx,
    *,
    context: ContextRecord,
    token_id: str,
    ttl_s: float,
    holder: Mapping[str, Any],
    idempotency_key: str | None,
    request_fingerprint: str | None,
    actor: str,
) -> LeaseRecord:
    lease_id = new_id()
    state = LeaseState.PENDING if context.state is ContextState.STARTING else LeaseState.ACTIVE
    row = tx.conn.execute(
        insert(leases)
        .values(
            id=lease_id,
            profile=context.profile,
            context_id=context.id,
            token_id=token_id,
            state=state.value,
            ttl_s=ttl_s,
            expires_at=tx.now + timedelta(seconds=ttl_s),
            created_at=tx.now,
            activated_at=tx.now if state is LeaseState.ACTIVE else None,
            holder=dict(holder),
            dag_id=_short(holder.get("dag_id")),
            run_id=_short(holder.get("run_id")),
            task_id=_short(holder.get("task_id")),
            idempotency_key=idempotency_key,
            request_fingerprint=request_fingerprint,
        )
        .returning(*leases.c)
    ).one()
    record_event(
        tx,
        kind="lease",
        actor=actor,
        lease_id=lease_id,
        context_id=context.id,
        to_state=state.value,
        reason=f"leased on context {context.id} ({context.state.value})",
    )
    tx.leases_changed.add(lease_id)
    return LeaseRecord.from_row(row)


def _short(value: Any) -> str | None:
    return None if value is None else str(value)[:250]


# -- reads ----------------------------------------------------------------------------------


def get_lease(tx: Tx, lease_id: str) -> LeaseRecord | None:
    row = tx.conn.execute(select(leases).where(leases.c.id == lease_id)).one_or_none()
    return None if row is None else LeaseRecord.from_row(row)


def lease_by_idempotency_key(tx: Tx, token_id: str, key: str) -> LeaseRecord | None:
    row = tx.conn.execute(
        select(leases).where(leases.c.token_id == token_id, leases.c.idempotency_key == key)
    ).one_or_none()
    return None if row is None else LeaseRecord.from_row(row)


def list_leases(
    tx: Tx,
    *,
    context_id: str | None = None,
    token_id: str | None = None,
    states: Iterable[LeaseState] | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    task_id: str | None = None,
    limit: int = 1000,
) -> list[LeaseRecord]:
    stmt = select(leases).order_by(leases.c.created_at.desc()).limit(limit)
    filters: list[ColumnElement[bool]] = []
    if context_id is not None:
        filters.append(leases.c.context_id == context_id)
    if token_id is not None:
        filters.append(leases.c.token_id == token_id)
    if states is not None:
        filters.append(leases.c.state.in_([s.value for s in states]))
    if dag_id is not None:
        filters.append(leases.c.dag_id == dag_id)
    if run_id is not None:
        filters.append(leases.c.run_id == run_id)
    if task_id is not None:
        filters.append(leases.c.task_id == task_id)
    if filters:
        stmt = stmt.where(and_(*filters))
    return [LeaseRecord.from_row(r) for r in tx.conn.execute(stmt)]


def earliest_expiry(tx: Tx, profile: str) -> datetime | None:
    value: datetime | None = tx.conn.execute(
        select(func.min(leases.c.expires_at)).where(
            leases.c.profile == profile,
            leases.c.state.in_([s.value for s in LIVE_LEASE_STATES]),
        )
    ).scalar()
    if value is not None and value.tzinfo is None:  # func.min() bypasses the TypeDecorator
        value = value.replace(tzinfo=UTC)
    return value


# -- one lease --------------------------------------------------------------------------------


def end_lease(
    tx: Tx, lease_id: str, to: LeaseState, *, actor: str, reason: str
) -> LeaseRecord | None:
    """End a live lease and give its slot back; the last lease out makes its context idle.

    Returns None if the lease was not live (already ended, or ended concurrently).
    """
    row = transition_lease(
        tx,
        lease_id,
        to,
        actor=actor,
        reason=reason,
        values={"ended_at": tx.now, "end_reason": reason},
    )
    if row is None:
        return None
    tx.profiles_freed.add(row.profile)
    give_back_slot(
        tx, row.context_id, actor=actor, reason=f"last lease {lease_id} ended ({to.value})"
    )
    return row


def heartbeat(tx: Tx, lease_id: str) -> LeaseRecord | None:
    """Extend a live, unexpired lease by its TTL; None if it is not live any more."""
    row = tx.conn.execute(
        update(leases)
        .where(
            leases.c.id == lease_id,
            leases.c.state.in_([s.value for s in LIVE_LEASE_STATES]),
            or_(
                leases.c.expires_at > tx.now,
                leases.c.id.in_(
                    select(queries.c.lease_id).where(queries.c.state == QueryState.RUNNING.value)
                ),
            ),
        )
        .values(heartbeat_at=tx.now)
        .returning(*leases.c)
    ).one_or_none()
    if row is None:
        return None
    record = LeaseRecord.from_row(row)
    expires_at = tx.now + timedelta(seconds=record.ttl_s)
    tx.conn.execute(update(leases).where(leases.c.id == lease_id).values(expires_at=expires_at))
    return LeaseRecord(**{**record.__dict__, "expires_at": expires_at})


#: One batched heartbeat: only onto a lease still active, never moving its expiry back (a
#: long query may have extended it meanwhile).
_EXPIRES = bindparam("b_expires", type_=leases.c.expires_at.type)
_WRITE_HEARTBEAT = (
    update(leases)
    .where(leases.c.id == bindparam("b_id"), leases.c.state == LeaseState.ACTIVE.value)
    .values(
        heartbeat_at=bindparam("b_beat", type_=leases.c.heartbeat_at.type),
        expires_at=case((leases.c.expires_at < _EXPIRES, _EXPIRES), else_=leases.c.expires_at),
    )
)


def write_heartbeats(tx: Tx, beats: Mapping[str, tuple[datetime, datetime]]) -> None:
    """Heartbeats acknowledged from memory (see :mod:`pclease_service.leases.heartbeats`):
    lease id -> (heartbeat_at, expires_at). In the order of the ids, so that replicas
    writing batches of the same leases lock their rows in one order (no deadlock)."""
    if beats:
        tx.conn.execute(
            _WRITE_HEARTBEAT,
            [
                {"b_id": lease_id, "b_beat": beat, "b_expires": expires}
                for lease_id, (beat, expires) in sorted(beats.items())
            ],
        )


def still_active(tx: Tx, lease_ids: Iterable[str], chunk: int = 500) -> set[str]:
    """Those of ``lease_ids`` that are active."""
    ids = list(lease_ids)
    active: set[str] = set()
    for start in range(0, len(ids), chunk):
        active.update(
            tx.conn.execute(
                select(leases.c.id).where(
                    leases.c.id.in_(ids[start : start + chunk]),
                    leases.c.state == LeaseState.ACTIVE.value,
                )
            ).scalars()
        )
    return active


def extend_lease(tx: Tx, lease_id: str) -> None:
    """Give a live lease a full TTL from now (after a long query, so the client can act)."""
    lease = get_lease(tx, lease_id)
    if lease is not None and not lease.state.is_terminal:
        tx.conn.execute(
            update(leases)
            .where(
                leases.c.id == lease_id,
                leases.c.expires_at < tx.now + timedelta(seconds=lease.ttl_s),
            )
            .values(expires_at=tx.now + timedelta(seconds=lease.ttl_s))
        )


def due_lease_ids(tx: Tx, limit: int = 500, *, grace_s: float = 0.0) -> list[str]:
    """Live leases whose deadline passed more than ``grace_s`` ago (see
    :attr:`~pclease_service.leases.heartbeats.ActiveLeases.grace_s`)."""
    return list(
        tx.conn.execute(
            select(leases.c.id)
            .where(
                leases.c.state.in_([s.value for s in LIVE_LEASE_STATES]),
                leases.c.expires_at <= tx.now - timedelta(seconds=grace_s),
                # A running query keeps its lease alive; its timeout bounds that.
                ~leases.c.id.in_(
                    select(queries.c.lease_id).where(queries.c.state == QueryState.RUNNING.value)
                ),
            )
            .order_by(leases.c.expires_at)
            .limit(limit)
        ).scalars()
    )


# -- every lease of one context -----------------------------------------------------------------


def _live_on(tx: Tx, context_id: str, states: Iterable[LeaseState]) -> list[str]:
    return list(
        tx.conn.execute(
            select(leases.c.id).where(
                leases.c.context_id == context_id,
                leases.c.state.in_([s.value for s in states]),
            )
        ).scalars()
    )


def activate_pending(tx: Tx, context_id: str, *, actor: str) -> None:
    """pending → active for every lease waiting on a context that now runs."""
    for lease_id in _live_on(tx, context_id, [LeaseState.PENDING]):
        transition_lease(
            tx,
            lease_id,
            LeaseState.ACTIVE,
            actor=actor,
            reason="its context is running",
            values={"activated_at": tx.now},
        )


def end_live_leases(tx: Tx, context_id: str, to: LeaseState, *, actor: str, reason: str) -> int:
    """End every live lease of a context whose slots are already gone (it failed or was
    stopped); returns how many ended."""
    ended = 0
    for lease_id in _live_on(tx, context_id, LIVE_LEASE_STATES):
        if transition_lease(
            tx,
            lease_id,
            to,
            actor=actor,
            reason=reason,
            values={"ended_at": tx.now, "end_reason": reason},
        ):
            ended += 1
    return ended
