"""Profile rows: one per configured profile, whose row lock serialises context allocation."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import insert, select, update

from pclease_service.db.schema import profiles
from pclease_service.db.tx import Tx


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
