"""Run units of work off the event loop: one thread hop and one transaction each."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from pclease_service.clock import Clock
from pclease_service.db.engine import READ_ONLY
from pclease_service.errors import DatabaseBusy
from pclease_service.store import Tx

T = TypeVar("T")

log = logging.getLogger("pclease.db")

#: PostgreSQL's serialization_failure and deadlock_detected: the transaction was rolled
#: back only because of a concurrent one, and the same unit can simply run again.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
WRITE_ATTEMPTS = 5


def _retryable(exc: DBAPIError) -> bool:
    return getattr(exc.orig, "sqlstate", None) in _RETRYABLE_SQLSTATES


class Database:
    """Owns the engine; ``write`` and ``read`` run a function inside one transaction in a
    worker thread, so the event loop never blocks on the database.

    A function may set ``tx.deferred_error``: it is raised after the commit, for requests
    that must persist a change (say, expire a lease) and still fail.

    ``on_commit`` sees every committed unit of ``write`` (on the event loop): the service
    passes ``Notifier.publish``, so no caller can forget to wake the waiters of a change.

    A write that PostgreSQL rolls back as a deadlock victim or a serialization failure is
    run again, with a fresh ``Tx``, up to ``WRITE_ATTEMPTS`` times (units are functions of
    their transaction, so running one again is safe); after that the caller gets
    :class:`~service.errors.DatabaseBusy` (503), never the driver's error.
    """

    def __init__(
        self,
        engine: Engine,
        clock: Clock,
        *,
        max_threads: int = 16,
        on_commit: Callable[[Tx], None] | None = None,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.on_commit = on_commit
        self._limiter = anyio.CapacityLimiter(max_threads)
        # SQLite has one writer at a time. Left to SQLite, waiting writers poll the lock
        # with sleeps of up to 100 ms; queueing them on a lock here instead hands the write
        # lock over at once and in order. Other processes (the CLI) still use busy_timeout.
        self._write_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    def _commit(self, fn: Callable[[Tx], T]) -> tuple[T, Tx]:
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                with self._write_lock, self.engine.begin() as conn:
                    tx = Tx(conn, self.clock.now())
                    result = fn(tx)
                return result, tx
            except DBAPIError as exc:
                if not _retryable(exc):
                    raise
                reason = str(exc.orig).splitlines()[0]
                if attempt == WRITE_ATTEMPTS:
                    log.warning("a write failed %d times (%s); giving up", attempt, reason)
                    raise DatabaseBusy(
                        "the database kept refusing this change because of concurrent "
                        "ones; nothing was changed, retry in a few seconds"
                    ) from exc
                log.info("a write lost to a concurrent one (%s); running it again", reason)
                # Jittered backoff, so the transactions that collided do not collide again.
                time.sleep(random.uniform(0, 0.01 * 2**attempt))
        raise AssertionError("unreachable")

    def write_sync(self, fn: Callable[[Tx], T]) -> tuple[T, Tx]:
        """For synchronous callers (the CLI, tests): no ``on_commit``."""
        result, tx = self._commit(fn)
        if tx.deferred_error is not None:
            raise tx.deferred_error
        return result, tx

    def read_sync(self, fn: Callable[[Tx], T]) -> T:
        with self.engine.connect().execution_options(**READ_ONLY) as conn, conn.begin():
            return fn(Tx(conn, self.clock.now()))

    async def write(self, fn: Callable[[Tx], T]) -> T:
        result, tx = await anyio.to_thread.run_sync(self._commit, fn, limiter=self._limiter)
        if self.on_commit is not None:
            self.on_commit(tx)
        if tx.deferred_error is not None:
            raise tx.deferred_error
        return result

    async def read(self, fn: Callable[[Tx], T]) -> T:
        return await anyio.to_thread.run_sync(self.read_sync, fn, limiter=self._limiter)
