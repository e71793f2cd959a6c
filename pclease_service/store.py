"""Every query the service issues, in one module.

Functions take a :class:`Tx` (an open transaction plus the time of the unit of work) and
never commit: the caller owns the transaction. State changes go through
:func:`_transition`, a guarded ``UPDATE ... WHERE id = :id AND state = :seen`` whose row
count is checked and which records an event with its actor and reason, so two actors can
never both apply one transition. Refcounts change in SQL, never read-modify-write.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Row,
    Table,
    and_,
    case,
    func,
    insert,
    or_,
    select,
    update,
)

from pclease_service.config import Profile
from pclease_service.db.schema import contexts, events, leases, profiles, queries, tokens
from pclease_service.states import (
    JOINABLE_CONTEXT_STATES,
    LIVE_CONTEXT_STATES,
    LIVE_LEASE_STATES,
    LIVE_QUERY_STATES,
    ContextState,
    LeaseState,
    QueryState,
    context_sources,
    lease_sources,
    query_sources,
)


@dataclass
class Tx:
    """One unit of work: a connection inside ``begin()``, its clock reading, and what it
    changed (so the async layer can wake waiters once the transaction has committed)."""

    conn: Connection
    now: datetime
    leases_changed: set[str] = field(default_factory=set)
    #: contexts whose state changed: the reconciler has something to do
    contexts_changed: set[str] = field(default_factory=set)
    profiles_freed: set[str] = field(default_factory=set)
    queries_changed: set[str] = field(default_factory=set)
    deferred_error: Exception | None = None


@dataclass(frozen=True)
class ContextRecord:
    id: str
    profile: str
    backend: str
    state: ContextState
    refcount: int
    leases_total: int
    hourly_cost: float
    backend_handle: Mapping[str, Any] | None
    status_message: str | None
    created_at: datetime
    started_at: datetime | None
    idle_since: datetime | None
    stopping_since: datetime | None
    stopped_at: datetime | None
    stop_reason: str | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> ContextRecord:
        m = dict(row._mapping)
        m["state"] = ContextState(m["state"])
        return cls(**m)


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


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    token_hash: str
    scopes: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> TokenRecord:
        m = dict(row._mapping)
        m["scopes"] = frozenset(s for s in m["scopes"].split(",") if s)
        return cls(**m)


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


def new_id() -> str:
    return str(uuid.uuid4())


def fingerprint(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# -- events and transitions ----------------------------------------------------------------


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


def _transition(
    tx: Tx,
    table: Table,
    row_id: str,
    allowed: frozenset[str],
    to: str,
    *,
    actor: str,
    reason: str,
    only_from: Iterable[str] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
) -> Row[Any] | None:
    """Move one row to ``to`` if it is in one of ``sources`` and ``where`` holds.

    Returns the updated row, or None when the row does not exist, is in another state, or
    lost a race to a concurrent actor (the guarded UPDATE matched nothing).
    """
    sources = allowed if only_from is None else allowed & frozenset(only_from)
    kind = {"contexts": "context", "leases": "lease", "queries": "query"}[table.name]
    for _ in range(3):
        seen = tx.conn.execute(select(table.c.state).where(table.c.id == row_id)).scalar()
        if seen is None or seen not in sources:
            return None
        stmt = (
            update(table)
            .where(table.c.id == row_id, table.c.state == seen, *where)
            .values(state=to, **(values or {}))
            .returning(*table.c)
        )
        row = tx.conn.execute(stmt).one_or_none()
        if row is None:
            # Either ``where`` does not hold or another actor moved the row in between;
            # look again so the caller sees the state that won.
            if tx.conn.execute(select(table.c.state).where(table.c.id == row_id)).scalar() == seen:
                return None
            continue
        m = row._mapping
        record_event(
            tx,
            kind=kind,
            actor=actor,
            reason=reason,
            context_id=row_id if kind == "context" else m["context_id"],
            lease_id=row_id if kind == "lease" else m.get("lease_id"),
            query_id=row_id if kind == "query" else None,
            from_state=seen,
            to_state=to,
        )
        if kind == "lease":
            tx.leases_changed.add(row_id)
        elif kind == "query":
            tx.queries_changed.add(row_id)
        else:
            tx.contexts_changed.add(row_id)
        return row
    return None


def transition_context(
    tx: Tx,
    context_id: str,
    to: ContextState,
    *,
    actor: str,
    reason: str,
    sources: Iterable[ContextState] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
) -> ContextRecord | None:
    row = _transition(
        tx,
        contexts,
        context_id,
        context_sources(to),
        to,
        actor=actor,
        reason=reason,
        only_from=sources,
        where=where,
        values=values,
    )
    return None if row is None else ContextRecord.from_row(row)


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
    row = _transition(
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


# -- profiles --------------------------------------------------------------------------


def sync_profiles(tx: Tx, names: Iterable[str]) -> None:
    known = set(tx.conn.execute(select(profiles.c.name)).scalars())
    for name in sorted(set(names) - known):
        tx.conn.execute(insert(profiles).values(name=name, lock_version=0))


def lock_profile(tx: Tx, name: str) -> None:
    """Serialise context allocation for one profile until the transaction ends.

    Lock order: a transaction takes the profile lock before any context row of that
    profile, and holds no context row when it asks for it. PostgreSQL keeps the row lock of
    every row an ``UPDATE`` had to wait for, even when the row then no longer matched its
    ``WHERE``; a failed join that went on to take the profile lock in the same transaction
    so held a context another allocator was waiting for, and the two deadlocked.
    """
    result = tx.conn.execute(
        update(profiles)
        .where(profiles.c.name == name)
        .values(lock_version=profiles.c.lock_version + 1)
    )
    if result.rowcount != 1:
        raise LookupError(f"profile {name!r} is not in the database; restart the service")


# -- contexts --------------------------------------------------------------------------

_PREFERENCE = case(
    (contexts.c.state == ContextState.RUNNING.value, 0),
    (contexts.c.state == ContextState.IDLE.value, 1),
    else_=2,
)


def join_context(
    tx: Tx, profile: Profile, *, actor: str, reason: str, wait: bool = True
) -> ContextRecord | None:
    """Take a slot on a joinable context of ``profile``: +1 refcount, and idle → running.

    Running contexts are preferred over idle ones (no state change) and over starting
    ones (no wait), and fuller contexts over emptier ones, so spare ones go idle and stop.

    With ``wait=False`` a context another transaction holds locked right now is skipped
    (``SKIP LOCKED`` on PostgreSQL), so the call never waits for a lock. Only a caller that
    holds the profile lock may wait (see :func:`lock_profile`).
    """
    conditions = [
        contexts.c.profile == profile.name,
        contexts.c.state.in_([s.value for s in JOINABLE_CONTEXT_STATES]),
        contexts.c.refcount < profile.max_leases_per_context,
    ]
    if profile.max_lifetime_s is not None:
        cutoff = tx.now - timedelta(seconds=profile.max_lifetime_s)
        conditions.append(contexts.c.created_at > cutoff)
    for _ in range(5):
        stmt = (
            select(contexts.c.id, contexts.c.state)
            .where(*conditions)
            .order_by(_PREFERENCE, contexts.c.refcount.desc(), contexts.c.created_at)
        )
        if not wait:
            # Lock the one best context that nobody holds (SQLite has no row locks and
            # renders nothing here: its writers are serialised anyway).
            stmt = stmt.limit(1).with_for_update(skip_locked=True, key_share=True)
        candidates = tx.conn.execute(stmt.limit(5) if wait else stmt).all()
        if not candidates:
            return None
        for context_id, state in candidates:
            if state == ContextState.IDLE.value:
                row = transition_context(
                    tx,
                    context_id,
                    ContextState.RUNNING,
                    actor=actor,
                    reason=reason,
                    sources=[ContextState.IDLE],
                    where=[contexts.c.refcount == 0],
                    values={
                        "refcount": contexts.c.refcount + 1,
                        "leases_total": contexts.c.leases_total + 1,
                        "idle_since": None,
                    },
                )
                if row is not None:
                    return row
                continue
            updated = tx.conn.execute(
                update(contexts)
                .where(
                    contexts.c.id == context_id,
                    contexts.c.state == state,
                    contexts.c.refcount < profile.max_leases_per_context,
                )
                .values(
                    refcount=contexts.c.refcount + 1,
                    leases_total=contexts.c.leases_total + 1,
                )
                .returning(*contexts.c)
            ).one_or_none()
            if updated is not None:
                # A refcount change alone gives the reconciler nothing to do.
                return ContextRecord.from_row(updated)
    return None


def count_live_contexts(tx: Tx, profile: str) -> int:
    return int(
        tx.conn.execute(
            select(func.count())
            .select_from(contexts)
            .where(
                contexts.c.profile == profile,
                contexts.c.state.in_([s.value for s in LIVE_CONTEXT_STATES]),
            )
        ).scalar_one()
    )


def create_context(
    tx: Tx, profile: Profile, backend: str, *, actor: str, reason: str
) -> ContextRecord:
    context_id = new_id()
    row = tx.conn.execute(
        insert(contexts)
        .values(
            id=context_id,
            profile=profile.name,
            backend=backend,
            state=ContextState.STARTING.value,
            refcount=1,
            leases_total=1,
            hourly_cost=profile.hourly_cost,
            created_at=tx.now,
        )
        .returning(*contexts.c)
    ).one()
    record_event(
        tx,
        kind="context",
        actor=actor,
        reason=reason,
        context_id=context_id,
        to_state=ContextState.STARTING.value,
    )
    tx.contexts_changed.add(context_id)
    return ContextRecord.from_row(row)


def get_context(tx: Tx, context_id: str) -> ContextRecord | None:
    row = tx.conn.execute(select(contexts).where(contexts.c.id == context_id)).one_or_none()
    return None if row is None else ContextRecord.from_row(row)


def list_contexts(
    tx: Tx,
    *,
    states: Iterable[ContextState] | None = None,
    profile: str | None = None,
    limit: int = 500,
) -> list[ContextRecord]:
    stmt = select(contexts).order_by(contexts.c.created_at.desc()).limit(limit)
    if states is not None:
        stmt = stmt.where(contexts.c.state.in_([s.value for s in states]))
    if profile is not None:
        stmt = stmt.where(contexts.c.profile == profile)
    return [ContextRecord.from_row(r) for r in tx.conn.execute(stmt)]


def save_handle(tx: Tx, context_id: str, handle: Mapping[str, Any]) -> None:
    tx.conn.execute(
        update(contexts).where(contexts.c.id == context_id).values(backend_handle=dict(handle))
    )


def set_status_message(tx: Tx, context_id: str, message: str | None) -> None:
    tx.conn.execute(
        update(contexts).where(contexts.c.id == context_id).values(status_message=message)
    )


def mark_started(tx: Tx, context_id: str, *, actor: str) -> ContextRecord | None:
    """starting → running (or idle, if every lease left while it booted); activates leases."""
    row = transition_context(
        tx,
        context_id,
        ContextState.RUNNING,
        actor=actor,
        reason="the backend reports the context running",
        sources=[ContextState.STARTING],
        where=[contexts.c.refcount > 0],
        values={"started_at": tx.now, "status_message": None},
    )
    if row is None:
        row = transition_context(
            tx,
            context_id,
            ContextState.IDLE,
            actor=actor,
            reason="started, but every lease ended while it booted",
            sources=[ContextState.STARTING],
            where=[contexts.c.refcount == 0],
            values={"started_at": tx.now, "idle_since": tx.now, "status_message": None},
        )
        if row is None:
            return None
    pending = (
        tx.conn.execute(
            select(leases.c.id).where(
                leases.c.context_id == context_id, leases.c.state == LeaseState.PENDING.value
            )
        )
        .scalars()
        .all()
    )
    for lease_id in pending:
        transition_lease(
            tx,
            lease_id,
            LeaseState.ACTIVE,
            actor=actor,
            reason="its context is running",
            values={"activated_at": tx.now},
        )
    return row


def _end_live_leases(tx: Tx, context_id: str, to: LeaseState, *, actor: str, reason: str) -> int:
    ids = (
        tx.conn.execute(
            select(leases.c.id).where(
                leases.c.context_id == context_id,
                leases.c.state.in_([s.value for s in LIVE_LEASE_STATES]),
            )
        )
        .scalars()
        .all()
    )
    ended = 0
    for lease_id in ids:
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


def fail_context(tx: Tx, context_id: str, message: str, *, actor: str) -> ContextRecord | None:
    """Any live state → failed; its leases fail with the same reason."""
    row = transition_context(
        tx,
        context_id,
        ContextState.FAILED,
        actor=actor,
        reason=message,
        values={
            "refcount": 0,
            "idle_since": None,
            "stopped_at": tx.now,
            "stop_reason": message,
            "status_message": message,
        },
    )
    if row is not None:
        _end_live_leases(
            tx, context_id, LeaseState.FAILED, actor=actor, reason=f"context failed: {message}"
        )
        tx.profiles_freed.add(row.profile)
    return row


def begin_idle_stop(
    tx: Tx, context_id: str, *, idle_cutoff: datetime, actor: str, reason: str
) -> ContextRecord | None:
    """idle → stopping, only if it is still idle, still empty and idle since ``idle_cutoff``.

    This is the fence against a lease arriving while the stop is decided: ``join_context``
    moves idle → running under the same guard, so exactly one of the two wins.
    """
    return transition_context(
        tx,
        context_id,
        ContextState.STOPPING,
        actor=actor,
        reason=reason,
        sources=[ContextState.IDLE],
        where=[contexts.c.refcount == 0, contexts.c.idle_since <= idle_cutoff],
        values={"stopping_since": tx.now, "stop_reason": reason, "idle_since": None},
    )


def force_stop(tx: Tx, context_id: str, *, actor: str, reason: str) -> ContextRecord | None:
    """Revoke every lease of the context and move it to stopping (admin, shutdown)."""
    row = transition_context(
        tx,
        context_id,
        ContextState.STOPPING,
        actor=actor,
        reason=reason,
        values={
            "refcount": 0,
            "stopping_since": tx.now,
            "stop_reason": reason,
            "idle_since": None,
        },
    )
    if row is not None:
        _end_live_leases(tx, context_id, LeaseState.REVOKED, actor=actor, reason=reason)
        tx.profiles_freed.add(row.profile)
    return row


def mark_stopped(tx: Tx, context_id: str, *, actor: str) -> ContextRecord | None:
    row = transition_context(
        tx,
        context_id,
        ContextState.STOPPED,
        actor=actor,
        reason="the backend confirmed the stop",
        values={"stopped_at": tx.now},
    )
    if row is not None:
        tx.profiles_freed.add(row.profile)
    return row


# -- leases ----------------------------------------------------------------------------


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
    remaining = tx.conn.execute(
        update(contexts)
        .where(contexts.c.id == row.context_id, contexts.c.refcount > 0)
        .values(refcount=contexts.c.refcount - 1)
        .returning(contexts.c.refcount, contexts.c.state)
    ).one_or_none()
    tx.profiles_freed.add(row.profile)
    if remaining is not None and remaining.refcount == 0:
        transition_context(
            tx,
            row.context_id,
            ContextState.IDLE,
            actor=actor,
            reason=f"last lease {lease_id} ended ({to.value})",
            sources=[ContextState.RUNNING],
            where=[contexts.c.refcount == 0],
            values={"idle_since": tx.now},
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


def due_lease_ids(tx: Tx, limit: int = 500) -> list[str]:
    return list(
        tx.conn.execute(
            select(leases.c.id)
            .where(
                leases.c.state.in_([s.value for s in LIVE_LEASE_STATES]),
                leases.c.expires_at <= tx.now,
                # A running query keeps its lease alive; its timeout bounds that.
                ~leases.c.id.in_(
                    select(queries.c.lease_id).where(queries.c.state == QueryState.RUNNING.value)
                ),
            )
            .order_by(leases.c.expires_at)
            .limit(limit)
        ).scalars()
    )


def earliest_expiry(tx: Tx, profile: str) -> datetime | None:
    value: datetime | None = tx.conn.execute(
        select(func.min(leases.c.expires_at)).where(
            leases.c.profile == profile,
            leases.c.state.in_([s.value for s in LIVE_LEASE_STATES]),
        )
    ).scalar()
    if value is not None and value.tzinfo is None:  # func.min() bypasses the TypeDecorator
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    return value


# -- events ------------------------------------------------------------------------------


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


# -- tokens ------------------------------------------------------------------------------


def insert_token(tx: Tx, *, name: str, token_hash: str, scopes: Iterable[str]) -> TokenRecord:
    row = tx.conn.execute(
        insert(tokens)
        .values(
            id=new_id(),
            name=name,
            token_hash=token_hash,
            scopes=",".join(sorted(scopes)),
            created_at=tx.now,
        )
        .returning(*tokens.c)
    ).one()
    return TokenRecord.from_row(row)


def token_by_hash(tx: Tx, token_hash: str) -> TokenRecord | None:
    row = tx.conn.execute(select(tokens).where(tokens.c.token_hash == token_hash)).one_or_none()
    return None if row is None else TokenRecord.from_row(row)


def token_by_name(tx: Tx, name: str) -> TokenRecord | None:
    row = tx.conn.execute(select(tokens).where(tokens.c.name == name)).one_or_none()
    return None if row is None else TokenRecord.from_row(row)


def list_tokens(tx: Tx) -> list[TokenRecord]:
    rows = tx.conn.execute(select(tokens).order_by(tokens.c.name))
    return [TokenRecord.from_row(r) for r in rows]


def revoke_token(tx: Tx, name: str) -> bool:
    result = tx.conn.execute(
        update(tokens)
        .where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
        .values(revoked_at=tx.now)
    )
    return result.rowcount == 1


def token_names(tx: Tx, ids: Iterable[str]) -> dict[str, str]:
    wanted = list(set(ids))
    if not wanted:
        return {}
    rows = tx.conn.execute(select(tokens.c.id, tokens.c.name).where(tokens.c.id.in_(wanted)))
    return {r.id: r.name for r in rows}


# -- queries -----------------------------------------------------------------------------


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

    @classmethod
    def from_row(cls, row: Row[Any]) -> QueryRecord:
        m = dict(row._mapping)
        m["state"] = QueryState(m["state"])
        return cls(**m)


def insert_query(
    tx: Tx,
    *,
    query_id: str,
    lease: LeaseRecord,
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
            lease_id=lease.id,
            context_id=lease.context_id,
            token_id=lease.token_id,
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
        context_id=lease.context_id,
        lease_id=lease.id,
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
    row = _transition(
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


def leases_with_running_queries(tx: Tx) -> set[str]:
    return set(
        tx.conn.execute(
            select(queries.c.lease_id).where(queries.c.state == QueryState.RUNNING.value)
        ).scalars()
    )


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
