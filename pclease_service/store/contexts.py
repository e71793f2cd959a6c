"""Context rows: slots (refcounts), the lifecycle's guarded transitions, backend handles.

Nothing here touches a lease row; what a context's change means for its leases is composed
in :mod:`pclease_service.contexts.lifecycle`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, case, func, insert, select, update

from pclease_service.config import Profile
from pclease_service.db.schema import contexts
from pclease_service.db.tx import Tx
from pclease_service.states import (
    JOINABLE_CONTEXT_STATES,
    LIVE_CONTEXT_STATES,
    ContextState,
    StopKind,
    context_sources,
)
from pclease_service.store.events import record_event
from pclease_service.store.transitions import guarded_transition, new_id


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
    stop_kind: StopKind | None = None
    fence: int = 0
    claimed_by: str | None = None
    claim_expires_at: datetime | None = None
    host_replica: str | None = None

    @classmethod
    def from_row(cls, row: Row[Any]) -> ContextRecord:
        m = dict(row._mapping)
        m["state"] = ContextState(m["state"])
        if m.get("stop_kind") is not None:
            m["stop_kind"] = StopKind(m["stop_kind"])
        return cls(**m)


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
    row = guarded_transition(
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


# -- slots ----------------------------------------------------------------------------------

_PREFERENCE = case(
    (contexts.c.state == ContextState.RUNNING.value, 0),
    (contexts.c.state == ContextState.IDLE.value, 1),
    else_=2,
)


def join_context(
    tx: Tx,
    profile: str,
    *,
    max_leases: int,
    created_after: datetime | None,
    actor: str,
    reason: str,
    wait: bool = True,
) -> ContextRecord | None:
    """Take a slot on a joinable context of ``profile``: +1 refcount, and idle → running.

    Running contexts are preferred over idle ones (no state change) and over starting
    ones (no wait), and fuller contexts over emptier ones, so spare ones go idle and stop.
    Only contexts created after ``created_after`` are joined (see
    :func:`pclease_service.contexts.rules.joinable_created_after`).

    With ``wait=False`` a context another transaction holds locked right now is skipped
    (``SKIP LOCKED`` on PostgreSQL), so the call never waits for a lock. Only a caller that
    holds the profile lock may wait (see :func:`pclease_service.store.profiles.lock_profile`).
    """
    conditions = [
        contexts.c.profile == profile,
        contexts.c.state.in_([s.value for s in JOINABLE_CONTEXT_STATES]),
        contexts.c.refcount < max_leases,
    ]
    if created_after is not None:
        conditions.append(contexts.c.created_at > created_after)
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
                    contexts.c.refcount < max_leases,
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


def give_back_slot(tx: Tx, context_id: str, *, actor: str, reason: str) -> None:
    """-1 refcount after a lease ended; the last one out makes a running context idle."""
    remaining = tx.conn.execute(
        update(contexts)
        .where(contexts.c.id == context_id, contexts.c.refcount > 0)
        .values(refcount=contexts.c.refcount - 1)
        .returning(contexts.c.refcount)
    ).one_or_none()
    if remaining is not None and remaining.refcount == 0:
        transition_context(
            tx,
            context_id,
            ContextState.IDLE,
            actor=actor,
            reason=reason,
            sources=[ContextState.RUNNING],
            where=[contexts.c.refcount == 0],
            values={"idle_since": tx.now},
        )


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
    """A new ``starting`` context holding one slot; the reconciler starts it."""
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


# -- reads ----------------------------------------------------------------------------------


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


# -- what the reconciler records --------------------------------------------------------------


def save_handle(tx: Tx, context_id: str, handle: Mapping[str, Any]) -> None:
    tx.conn.execute(
        update(contexts).where(contexts.c.id == context_id).values(backend_handle=dict(handle))
    )


def set_status_message(tx: Tx, context_id: str, message: str | None) -> None:
    tx.conn.execute(
        update(contexts).where(contexts.c.id == context_id).values(status_message=message)
    )


def mark_started(tx: Tx, context_id: str, *, actor: str) -> ContextRecord | None:
    """starting → running, or idle if every lease left while it booted."""
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
    return row


def fail_context(tx: Tx, context_id: str, message: str, *, actor: str) -> ContextRecord | None:
    """Any live state → failed, its slots dropped."""
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
            "stop_kind": StopKind.FAILED.value,
            "status_message": message,
        },
    )
    if row is not None:
        tx.profiles_freed.add(row.profile)
    return row


def begin_idle_stop(
    tx: Tx,
    context_id: str,
    *,
    idle_since: datetime,
    kind: StopKind,
    actor: str,
    reason: str,
) -> ContextRecord | None:
    """idle → stopping, only if it is still idle, still empty and has been idle since
    ``idle_since`` (what the decision to stop it saw) or earlier.

    This is the fence against a lease arriving while the stop is decided: ``join_context``
    moves idle → running under the same guard, and a context that went running and idle
    again since has a later ``idle_since``; so exactly one of the two wins.
    """
    return transition_context(
        tx,
        context_id,
        ContextState.STOPPING,
        actor=actor,
        reason=reason,
        sources=[ContextState.IDLE],
        where=[contexts.c.refcount == 0, contexts.c.idle_since <= idle_since],
        values={
            "stopping_since": tx.now,
            "stop_reason": reason,
            "stop_kind": kind.value,
            "idle_since": None,
        },
    )


def force_stop(
    tx: Tx, context_id: str, *, kind: StopKind, actor: str, reason: str
) -> ContextRecord | None:
    """Any live state → stopping now, its slots dropped (admin, shutdown)."""
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
            "stop_kind": kind.value,
            "idle_since": None,
        },
    )
    if row is not None:
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
