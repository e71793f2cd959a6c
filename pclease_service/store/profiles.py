"""Profile rows: one per configured profile, whose row lock serialises context allocation."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from pclease_service.db.schema import profiles
from pclease_service.db.tx import Tx


def sync_profiles(tx: Tx, names: Iterable[str]) -> None:
    """Make a row for every configured profile. Replicas starting together insert the
    same names at once: an existing row is left alone (ON CONFLICT DO NOTHING)."""
    known = set(tx.conn.execute(select(profiles.c.name)).scalars())
    dialect = tx.conn.dialect.name
    for name in sorted(set(names) - known):
        stmt: Any
        if dialect == "postgresql":
            stmt = pg_insert(profiles).values(name=name, lock_version=0).on_conflict_do_nothing()
        elif dialect == "sqlite":
            stmt = sqlite_insert(profiles).values(name=name, lock_version=0)
            stmt = stmt.on_conflict_do_nothing()
        else:
            stmt = insert(profiles).values(name=name, lock_version=0)
        tx.conn.execute(stmt)


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
