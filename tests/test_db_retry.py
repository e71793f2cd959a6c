"""Database.write runs a unit again when PostgreSQL rolls it back only because of a
concurrent one (deadlock victim, serialization failure), a bounded number of times; other
database errors pass through at once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from pclease_service.clock import FakeClock
from pclease_service.db.engine import create_db_engine
from pclease_service.db.migrate import upgrade
from pclease_service.db.schema import profiles
from pclease_service.db.session import WRITE_ATTEMPTS, Database
from pclease_service.errors import DatabaseBusy
from pclease_service.store import Tx
from tests.conftest import _truncate


def with_profiles(engine: Engine) -> Database:
    database = Database(engine, FakeClock())
    database.write_sync(
        lambda tx: [
            tx.conn.execute(insert(profiles).values(name=name, lock_version=0))
            for name in ("a", "b")
        ]
    )
    return database


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    upgrade(database_url)
    engine = create_db_engine(database_url, pool_size=4)
    yield with_profiles(engine)
    engine.dispose()


@pytest.fixture
def pg_db(pg_database: str) -> Iterator[Database]:
    _truncate(pg_database)
    engine = create_db_engine(pg_database, pool_size=4)
    yield with_profiles(engine)
    engine.dispose()


def versions(db: Database) -> dict[str, int]:
    rows = db.read_sync(lambda tx: tx.conn.execute(select(profiles)).all())
    return {r.name: r.lock_version for r in rows}


def bump(tx: Tx, name: str) -> None:
    tx.conn.execute(
        update(profiles)
        .where(profiles.c.name == name)
        .values(lock_version=profiles.c.lock_version + 1)
    )


@pytest.mark.postgres
def test_a_real_deadlock_victim_is_run_again(pg_db: Database) -> None:
    """Two units lock the same two rows in opposite orders; PostgreSQL picks one as the
    victim, and Database runs it again once the other has committed."""
    both_hold_one = threading.Barrier(2, timeout=30)
    attempts: dict[str, int] = {"ab": 0, "ba": 0}

    def unit(first: str, second: str) -> Any:
        def run(tx: Tx) -> str:
            attempts[first + second] += 1
            bump(tx, first)
            if attempts[first + second] == 1:
                both_hold_one.wait()  # now each holds the row the other needs next
            bump(tx, second)
            return first + second

        return run

    with ThreadPoolExecutor(2) as pool:
        done = [
            pool.submit(pg_db.write_sync, unit("a", "b")),
            pool.submit(pg_db.write_sync, unit("b", "a")),
        ]
        results = [f.result(timeout=60)[0] for f in done]

    assert results == ["ab", "ba"]
    assert sorted(attempts.values()) == [1, 2], attempts  # exactly one victim, run twice
    # The victim's first attempt left nothing behind: each unit counted once per row.
    assert versions(pg_db) == {"a": 2, "b": 2}


def deadlock() -> OperationalError:
    return OperationalError(
        "UPDATE profiles ...", {}, psycopg.errors.DeadlockDetected("deadlock detected")
    )


def test_a_write_that_keeps_losing_gives_up_with_database_busy(db: Database) -> None:
    attempts = 0

    def unit(tx: Tx) -> None:
        nonlocal attempts
        attempts += 1
        bump(tx, "a")  # rolled back with each attempt
        raise deadlock()

    with pytest.raises(DatabaseBusy) as refused:
        db.write_sync(unit)
    assert attempts == WRITE_ATTEMPTS
    assert refused.value.status == 503
    assert "retry" in refused.value.message
    assert versions(db) == {"a": 0, "b": 0}


def test_a_serialization_failure_is_run_again(db: Database) -> None:
    attempts = 0

    def unit(tx: Tx) -> int:
        nonlocal attempts
        attempts += 1
        bump(tx, "b")
        if attempts < 3:
            raise OperationalError(
                "UPDATE ...", {}, psycopg.errors.SerializationFailure("could not serialize")
            )
        return attempts

    assert db.write_sync(unit)[0] == 3
    assert versions(db) == {"a": 0, "b": 1}


def test_other_database_errors_are_not_run_again(db: Database) -> None:
    attempts = 0

    def unit(tx: Tx) -> None:
        nonlocal attempts
        attempts += 1
        tx.conn.execute(insert(profiles).values(name="a", lock_version=0))

    with pytest.raises(IntegrityError):
        db.write_sync(unit)
    assert attempts == 1
