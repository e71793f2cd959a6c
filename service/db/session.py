"""Run units of work off the event loop: one thread hop and one transaction each."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

import anyio
import anyio.to_thread
from sqlalchemy import Engine

from service.clock import Clock
from service.db.engine import READ_ONLY
from service.store import Tx

T = TypeVar("T")


class Database:
    """Owns the engine; ``write`` and ``read`` run a function inside one transaction in a
    worker thread, so the event loop never blocks on the database.

    A function may set ``tx.deferred_error``: it is raised after the commit, for requests
    that must persist a change (say, expire a lease) and still fail.
    """

    def __init__(self, engine: Engine, clock: Clock, *, max_threads: int = 16) -> None:
        self.engine = engine
        self.clock = clock
        self._limiter = anyio.CapacityLimiter(max_threads)
        # SQLite has one writer at a time. Left to SQLite, waiting writers poll the lock
        # with sleeps of up to 100 ms; queueing them on a lock here instead hands the write
        # lock over at once and in order. Other processes (the CLI) still use busy_timeout.
        self._write_lock: threading.Lock | contextlib.nullcontext[None] = (
            threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )

    def write_sync(self, fn: Callable[[Tx], T]) -> tuple[T, Tx]:
        with self._write_lock, self.engine.begin() as conn:
            tx = Tx(conn, self.clock.now())
            result = fn(tx)
        if tx.deferred_error is not None:
            raise tx.deferred_error
        return result, tx

    def read_sync(self, fn: Callable[[Tx], T]) -> T:
        with self.engine.connect().execution_options(**READ_ONLY) as conn, conn.begin():
            return fn(Tx(conn, self.clock.now()))

    async def write(self, fn: Callable[[Tx], T]) -> tuple[T, Tx]:
        return await anyio.to_thread.run_sync(self.write_sync, fn, limiter=self._limiter)

    async def read(self, fn: Callable[[Tx], T]) -> T:
        return await anyio.to_thread.run_sync(self.read_sync, fn, limiter=self._limiter)
