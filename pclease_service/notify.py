"""In-process wake-ups after a transaction commits.

The database is the truth; these only shorten waits. Every waiter also re-checks the
database on a short interval, so a second service replica's changes are seen too.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque

from pclease_service.store import Tx


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


async def wait_token(token: asyncio.Event, timeout_s: float) -> bool:
    try:
        await asyncio.wait_for(token.wait(), max(0.0, timeout_s))
    except TimeoutError:
        return False
    return True


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
        if tx.queries_changed or tx.leases_changed:
            self.runner.set()
