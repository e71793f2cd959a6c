"""Run units of work off the event loop: one thread hop and one transaction each."""

from __future__ import annotations

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

    def write_sync(self, fn: Callable[[Tx], T]) -> tuple[T, Tx]:
        with self.engine.begin() as conn:
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
