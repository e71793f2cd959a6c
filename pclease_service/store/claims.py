"""Claims: which replica acts on a context, and the fence that proves it still does.

One actor per context. A replica claims live contexts that nobody holds (or whose claim
expired), renewing its own on every reconciler tick; each new claim bumps the context's
``fence``. Every write that records a backend side effect (a handle, a start, a stop, a
failure) first passes :func:`hold`, one guarded ``UPDATE ... WHERE id = :id AND fence =
:fence AND claimed_by = :replica`` whose row count is checked: it also takes the row's
lock, so no other replica can claim the context until that transaction ends. A replica
that was paused or deposed meanwhile gets :class:`FenceLost` and writes nothing.

On PostgreSQL the claim skips rows another transaction holds (``FOR UPDATE SKIP LOCKED``),
so replicas never queue on each other; SQLite serialises writers, and the same guarded
UPDATE decides there.

Contexts of a backend whose contexts live on one replica's machine (local workers) are
claimed only by their host while it is alive, and a host takes its contexts back from
anyone (a replica restarted under the same id); once the host is not alive, anyone may
claim them, and then adopts the worker if it can reach it, or fails the context once the
host has been silent for ``replica_ttl_s`` (a host that is merely restarting comes back
sooner).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, or_, select, update

from pclease_service.db.schema import contexts
from pclease_service.db.tx import Tx
from pclease_service.states import LIVE_CONTEXT_STATES
from pclease_service.store.contexts import ContextRecord
from pclease_service.store.replicas import alive_subquery


class FenceLost(Exception):
    """This replica's claim on a context is no longer the current one: write nothing."""


@dataclass(frozen=True)
class Fence:
    """A claim: ``replica`` acts on ``context_id`` while the context's fence is ``token``."""

    context_id: str
    replica: str
    token: int


def fence_of(record: ContextRecord) -> Fence:
    assert record.claimed_by is not None
    return Fence(record.id, record.claimed_by, record.fence)


def claim_contexts(
    tx: Tx,
    replica: str,
    *,
    ttl_s: float,
    hosted: bool,
    take_new: bool = True,
    limit: int = 1000,
) -> list[ContextRecord]:
    """Renew this replica's claims and (with ``take_new``) claim free live contexts;
    returns every live context it holds now, with its fence."""
    now = tx.now
    until = now + timedelta(seconds=ttl_s)
    live = [s.value for s in LIVE_CONTEXT_STATES]
    tx.conn.execute(
        update(contexts)
        .where(contexts.c.claimed_by == replica, contexts.c.state.in_(live))
        .values(claim_expires_at=until)
    )
    if take_new:
        alive = alive_subquery(now, ttl_s)
        free = or_(
            contexts.c.claimed_by.is_(None),
            contexts.c.claim_expires_at < now,
            contexts.c.claimed_by.not_in(alive),
        )
        if hosted:
            # A host takes its own contexts back (after a restart under the same id).
            free = or_(
                free, and_(contexts.c.host_replica == replica, contexts.c.claimed_by != replica)
            )
        conditions = [contexts.c.state.in_(live), free]
        if hosted:
            conditions.append(
                or_(
                    contexts.c.host_replica.is_(None),
                    contexts.c.host_replica == replica,
                    contexts.c.host_replica.not_in(alive),
                )
            )
        candidates = (
            tx.conn.execute(
                select(contexts.c.id)
                .where(*conditions)
                .order_by(contexts.c.created_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
            .scalars()
            .all()
        )
        for context_id in candidates:
            tx.conn.execute(
                update(contexts)
                .where(contexts.c.id == context_id, *conditions)
                .values(
                    claimed_by=replica,
                    claim_expires_at=until,
                    fence=contexts.c.fence + 1,
                )
            )
    rows = tx.conn.execute(
        select(contexts)
        .where(contexts.c.claimed_by == replica, contexts.c.state.in_(live))
        .order_by(contexts.c.created_at)
    )
    return [ContextRecord.from_row(r) for r in rows]


def hold(tx: Tx, fence: Fence) -> None:
    """Check, inside the caller's transaction, that ``fence`` is still the context's
    current claim, and lock the row until the transaction ends; raise FenceLost if not."""
    result = tx.conn.execute(
        update(contexts)
        .where(
            contexts.c.id == fence.context_id,
            contexts.c.fence == fence.token,
            contexts.c.claimed_by == fence.replica,
        )
        .values(claimed_by=fence.replica)
    )
    if result.rowcount != 1:
        raise FenceLost(
            f"replica {fence.replica} no longer holds context {fence.context_id} "
            f"(fence {fence.token})"
        )


def still_held(tx: Tx, fence: Fence) -> bool:
    """A read for callers about to make a backend call: is the claim still current?"""
    row = tx.conn.execute(
        select(contexts.c.fence, contexts.c.claimed_by, contexts.c.claim_expires_at).where(
            contexts.c.id == fence.context_id
        )
    ).one_or_none()
    return (
        row is not None
        and row.fence == fence.token
        and row.claimed_by == fence.replica
        and row.claim_expires_at is not None
        and row.claim_expires_at > tx.now
    )


def release_claims(tx: Tx, replica: str) -> int:
    """Give up every claim (a draining replica, once its calls in flight are done), so
    another replica takes the contexts over at its next tick rather than at expiry."""
    result = tx.conn.execute(
        update(contexts)
        .where(contexts.c.claimed_by == replica)
        .values(claimed_by=None, claim_expires_at=None)
    )
    return int(result.rowcount or 0)


def set_host(tx: Tx, fence: Fence, host: str | None) -> None:
    hold(tx, fence)
    tx.conn.execute(
        update(contexts).where(contexts.c.id == fence.context_id).values(host_replica=host)
    )
