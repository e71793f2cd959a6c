"""Time as a dependency: what time it is, and every wait with a deadline.

The service reads the time and waits only through a :class:`Clock`, so tests move a
:class:`FakeClock` instead of sleeping: ``advance`` wakes every coroutine whose deadline
it passed, and nothing on a fake clock times out unless a test moves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for deadlines and latencies)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return once ``seconds`` have passed on this clock."""
        ...

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        """Return True once ``event`` is set, or False once ``timeout_s`` have passed."""
        ...


async def within(clock: Clock, timeout_s: float, awaitable: Awaitable[T]) -> T:
    """The result of ``awaitable``; once ``timeout_s`` have passed on ``clock`` it is
    cancelled and TimeoutError raised instead."""
    task = asyncio.ensure_future(awaitable)
    timer = asyncio.ensure_future(clock.sleep(timeout_s))
    try:
        await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        timer.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, timer, return_exceptions=True)
    if task.cancelled():
        raise TimeoutError
    return task.result()


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(event.wait(), max(0.0, timeout_s))
        except TimeoutError:
            return event.is_set()
        return True


@dataclass(eq=False)
class _Sleeper:
    deadline: datetime
    future: asyncio.Future[None] = field(repr=False)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class FakeClock:
    """A clock that only moves when told to (thread-safe; waiters live on event loops)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._now = self._start
        self._lock = threading.Lock()
        self._sleepers: list[_Sleeper] = []
        # (count, event): set once at least ``count`` coroutines sleep on this clock.
        self._watchers: list[tuple[int, asyncio.Event]] = []

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        with self._lock:
            return (self._now - self._start).total_seconds()

    def advance(self, seconds: float) -> datetime:
        """Move the clock on and wake every sleeper whose deadline has now passed."""
        with self._lock:
            self._now += timedelta(seconds=seconds)
            now = self._now
            due = [s for s in self._sleepers if s.deadline <= now]
            self._sleepers = [s for s in self._sleepers if s.deadline > now]
        for sleeper in due:
            loop = sleeper.future.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(_wake, sleeper.future)
        return now

    @property
    def sleeping(self) -> int:
        """How many coroutines wait on this clock now."""
        with self._lock:
            return len(self._sleepers)

    async def sleepers(self, count: int = 1, *, within_s: float = 10.0) -> None:
        """Return once at least ``count`` coroutines wait on this clock (for tests: a
        waiter has parked); TimeoutError if that does not happen within ``within_s`` of
        real time."""
        event = asyncio.Event()
        with self._lock:
            if len(self._sleepers) >= count:
                return
            self._watchers.append((count, event))
        try:
            async with asyncio.timeout(within_s):
                await event.wait()
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._watchers.remove((count, event))

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            sleeper = _Sleeper(self._now + timedelta(seconds=seconds), future)
            self._sleepers.append(sleeper)
            for count, event in self._watchers:
                if len(self._sleepers) >= count:
                    event.set()
        try:
            await future
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._sleepers.remove(sleeper)

    async def wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        if event.is_set():
            return True
        if timeout_s <= 0:
            return False
        waiter = asyncio.ensure_future(event.wait())
        timer = asyncio.ensure_future(self.sleep(timeout_s))
        try:
            await asyncio.wait({waiter, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, timer):
                task.cancel()
            await asyncio.gather(waiter, timer, return_exceptions=True)
        return event.is_set()
