"""What each token holds and started: the rows its quotas, ``/metrics`` and the dashboard
count. A context counts for the token whose lease request created it (``context_starters``);
a lease that joined a context adds nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, insert, or_, select

from pclease_service.db.schema import context_starters, contexts, leases, tokens
from pclease_service.db.tx import Tx
from pclease_service.states import LIVE_CONTEXT_STATES, LIVE_LEASE_STATES, ContextState

_LIVE_LEASES = [s.value for s in LIVE_LEASE_STATES]
_LIVE_CONTEXTS = [s.value for s in LIVE_CONTEXT_STATES]


@dataclass(frozen=True)
class StartedContext:
    """A context some token's lease request created, as its quotas count it."""

    token_id: str
    context_id: str
    profile: str
    state: ContextState
    created_at: datetime
    stopped_at: datetime | None
    hourly_cost: float


def lock_token(tx: Tx, token_id: str) -> None:
    """Serialise the grants of one token until the transaction ends, so two concurrent
    requests cannot both pass a limit.

    PostgreSQL: ``FOR NO KEY UPDATE`` on the token row, which does not block inserts that
    only reference the token (their foreign key takes ``FOR KEY SHARE``). SQLite: every
    writer holds the database's write lock already (``BEGIN IMMEDIATE``). Lock order: the
    token before the profile (:func:`~pclease_service.store.profiles.lock_profile`) and
    before any context row.
    """
    tx.conn.execute(
        select(tokens.c.id).where(tokens.c.id == token_id).with_for_update(key_share=True)
    )


def record_starter(tx: Tx, context_id: str, token_id: str) -> None:
    tx.conn.execute(insert(context_starters).values(context_id=context_id, token_id=token_id))


def live_lease_count(tx: Tx, token_id: str) -> int:
    return int(
        tx.conn.execute(
            select(func.count())
            .select_from(leases)
            .where(leases.c.token_id == token_id, leases.c.state.in_(_LIVE_LEASES))
        ).scalar_one()
    )


def _aware(value: datetime | None) -> datetime | None:
    # func.min() bypasses the TypeDecorator.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def earliest_lease_expiry(tx: Tx, token_id: str) -> datetime | None:
    """When the first of the token's live leases expires unless it heartbeats."""
    return _aware(
        tx.conn.execute(
            select(func.min(leases.c.expires_at)).where(
                leases.c.token_id == token_id, leases.c.state.in_(_LIVE_LEASES)
            )
        ).scalar()
    )


def earliest_expiry_on_started(tx: Tx, token_id: str, profile: str) -> datetime | None:
    """When the first live lease on a live context the token started on ``profile``
    expires unless it heartbeats (then that context has room again)."""
    started = (
        select(context_starters.c.context_id)
        .join(contexts, contexts.c.id == context_starters.c.context_id)
        .where(
            context_starters.c.token_id == token_id,
            contexts.c.profile == profile,
            contexts.c.state.in_(_LIVE_CONTEXTS),
        )
    )
    return _aware(
        tx.conn.execute(
            select(func.min(leases.c.expires_at)).where(
                leases.c.context_id.in_(started), leases.c.state.in_(_LIVE_LEASES)
            )
        ).scalar()
    )


def started_since(tx: Tx, since: datetime, token_id: str | None = None) -> list[StartedContext]:
    """Contexts started by a token (``token_id``, or any) that are live or stopped after
    ``since``."""
    stmt = (
        select(
            context_starters.c.token_id,
            contexts.c.id,
            contexts.c.profile,
            contexts.c.state,
            contexts.c.created_at,
            contexts.c.stopped_at,
            contexts.c.hourly_cost,
        )
        .join(contexts, contexts.c.id == context_starters.c.context_id)
        .where(
            or_(
                contexts.c.state.in_(_LIVE_CONTEXTS),
                contexts.c.stopped_at.is_(None),
                contexts.c.stopped_at > since,
            )
        )
    )
    if token_id is not None:
        stmt = stmt.where(context_starters.c.token_id == token_id)
    return [
        StartedContext(
            token_id=row.token_id,
            context_id=row.id,
            profile=row.profile,
            state=ContextState(row.state),
            created_at=row.created_at,
            stopped_at=row.stopped_at,
            hourly_cost=row.hourly_cost,
        )
        for row in tx.conn.execute(stmt)
    ]


def live_leases_by_token(tx: Tx) -> dict[str, int]:
    rows = tx.conn.execute(
        select(leases.c.token_id, func.count())
        .where(leases.c.state.in_(_LIVE_LEASES))
        .group_by(leases.c.token_id)
    )
    return {token_id: int(count) for token_id, count in rows}
