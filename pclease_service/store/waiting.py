"""Waiting tickets: one row per lease request waiting for capacity, on any replica.

The ticket with the smallest id of a profile (the oldest) among the live ones is the head
of the profile's line. Only the head may take capacity that frees up, and a request that
holds no ticket may take capacity only while nobody waits: :func:`may_take` is checked in
the same transaction that grants the lease. A ticket is live until its ``expires_at`` (its
waiter's deadline) while its replica is alive; a waiter deletes its ticket when it stops
waiting, and tickets of replicas that are gone are dropped.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, insert, or_, select

from pclease_service.db.schema import waiting_tickets
from pclease_service.db.tx import Tx
from pclease_service.store.replicas import alive_subquery


def take_ticket(tx: Tx, profile: str, *, replica: str, expires_at: datetime) -> int:
    ticket = tx.conn.execute(
        insert(waiting_tickets)
        .values(profile=profile, replica=replica, created_at=tx.now, expires_at=expires_at)
        .returning(waiting_tickets.c.id)
    ).scalar_one()
    return int(ticket)


def drop_ticket(tx: Tx, ticket: int) -> None:
    tx.conn.execute(delete(waiting_tickets).where(waiting_tickets.c.id == ticket))


def may_take(tx: Tx, profile: str, ticket: int | None, *, replica: str, ttl_s: float) -> bool:
    """Whether a request holding ``ticket`` (None: none) may take capacity now."""
    live = [
        waiting_tickets.c.profile == profile,
        waiting_tickets.c.expires_at >= tx.now,
        or_(
            waiting_tickets.c.replica == replica,
            waiting_tickets.c.replica.in_(alive_subquery(tx.now, ttl_s)),
        ),
    ]
    head = tx.conn.execute(select(func.min(waiting_tickets.c.id)).where(*live)).scalar()
    return head is None or head == ticket


def drop_tickets_of_dead(tx: Tx, *, alive: set[str]) -> int:
    result = tx.conn.execute(
        delete(waiting_tickets).where(
            or_(waiting_tickets.c.replica.not_in(alive), waiting_tickets.c.expires_at < tx.now)
        )
    )
    return int(result.rowcount or 0)
