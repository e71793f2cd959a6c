"""In-process wake-ups after a transaction commits, and the one long-poll loop.

The database is the truth; these only shorten waits. Every waiter also re-checks the
database every ``RECHECK_S`` (on the service's clock), so a second service replica's
changes are seen too.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pclease_service.clock import Clock
from pclease_service.db.tx import Tx

T = TypeVar("T")

#: Waiters re-check the database this often even without a wake-up.
RECHECK_S = 1.0


class Pulse:
    """Wake every coroutine currently waiting, without a lost-wakeup window: take
    :meth:`token` *before* checking the condition, then wait on that token."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def token(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


async def long_poll(
    clock: Clock,
    wait_s: float,
    *,
    token: Callable[[], asyncio.Event],
    read: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    ended: Callable[[], bool] = lambda: False,
) -> T:
    """Read until ``done(value)`` or ``wait_s`` has passed on ``clock``, whichever comes
    first; between reads, wait for the wake-up ``token()`` (taken before each read, so no
    wake-up is lost) or ``RECHECK_S``. Once ``ended()`` (the replica drains) the value read
    is answered at once, like a wait that ran out: the caller polls again elsewhere."""
    deadline = clock.monotonic() + wait_s
    while True:
        event = token()
        value = await read()
        remaining = deadline - clock.monotonic()
        if done(value) or remaining <= 0 or ended():
            return value
        await clock.wait(event, min(remaining, RECHECK_S))


class ProfileQueue:
    """FIFO order among lease requests waiting for capacity on one profile."""

    def __init__(self) -> None:
        self.tickets: deque[object] = deque()
        self.pulse = Pulse()

    def enter(self) -> object:
        ticket = object()
        self.tickets.append(ticket)
        return ticket

    def is_head(self, ticket: object) -> bool:
        return bool(self.tickets) and self.tickets[0] is ticket

    def leave(self, ticket: object) -> None:
        was_head = self.is_head(ticket)
        self.tickets.remove(ticket)
        if was_head:
            self.pulse.fire()


class Notifier:
    def __init__(self) -> None:
        self.reconciler = asyncio.Event()
        self.runner = asyncio.Event()
        self._leases: dict[str, Pulse] = defaultdict(Pulse)
        self._queries: dict[str, Pulse] = defaultdict(Pulse)
        self.queues: dict[str, ProfileQueue] = defaultdict(ProfileQueue)
        #: Set when this replica drains: waiters end now instead of at their deadline.
        self.draining = False

    def begin_drain(self) -> None:
        self.draining = True
        for pulses in (self._leases, self._queries):
            for pulse in list(pulses.values()):
                pulse.fire()
        for queue in list(self.queues.values()):
            queue.pulse.fire()

    def lease_token(self, lease_id: str) -> asyncio.Event:
        return self._leases[lease_id].token()

    def query_token(self, query_id: str) -> asyncio.Event:
        return self._queries[query_id].token()

    def publish(self, tx: Tx) -> None:
        for lease_id in tx.leases_changed:
            pulse = self._leases.pop(lease_id, None)
            if pulse is not None:
                pulse.fire()
        for profile in tx.profiles_freed:
            self.queues[profile].pulse.fire()
        for query_id in tx.queries_changed:
            pulse = self._queries.pop(query_id, None)
            if pulse is not None:
                pulse.fire()
        if tx.contexts_changed:
            self.reconciler.set()
        if (tx.queries_changed or tx.leases_changed) and not tx.by_runner:
            self.runner.set()
