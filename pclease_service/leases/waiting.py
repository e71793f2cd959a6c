"""Waiting for capacity: first in, first out per profile across every replica, on the
service's clock.

A request first tries at once; it may take capacity only if nobody waits for the profile
(anywhere). If it got nothing it takes a waiting ticket (a row, ordered by arrival: see
:mod:`pclease_service.store.waiting`) and tries again whenever capacity may have been
freed here (a lease ended, a context stopped: the queue's pulse) or every ``RECHECK_S``
for other replicas' changes, until its ``wait_s`` has passed; only the oldest live ticket's
attempt can succeed. The line only orders requests that have already found the profile
full, so the common case costs one indexed read in the granting transaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pclease_service.clock import Clock
from pclease_service.errors import CapacityExhausted, Draining
from pclease_service.leases.grant import Grant
from pclease_service.notify import RECHECK_S, ProfileQueue

#: Try with this ticket (None: before taking one); the grant checks the turn.
Attempt = Callable[[int | None], Awaitable[Grant]]


class Tickets:
    """Taking and giving back a waiting ticket (rows in the database)."""

    async def take(self, wait_s: float) -> int:
        raise NotImplementedError

    async def give_back(self, ticket: int) -> None:
        raise NotImplementedError


async def wait_in_line(
    queue: ProfileQueue,
    clock: Clock,
    wait_s: float,
    attempt: Attempt,
    full: Callable[[int], CapacityExhausted],
    tickets: Tickets,
    ended: Callable[[], bool] = lambda: False,
) -> Grant:
    """The first grant that got a lease; ``full(retry_after_s)`` is raised once ``wait_s``
    has passed without one, :class:`Draining` once ``ended()`` (the replica drains: the
    client asks again, and another replica puts it in line)."""
    deadline = clock.monotonic() + wait_s
    outcome = await attempt(None)
    if outcome.lease is not None:
        return outcome
    retry_after = outcome.retry_after_s
    if deadline - clock.monotonic() <= 0:
        raise full(retry_after)
    ticket = await tickets.take(wait_s)
    try:
        while True:
            token = queue.pulse.token()
            if deadline - clock.monotonic() > 0:
                outcome = await attempt(ticket)
                if outcome.lease is not None:
                    return outcome
                retry_after = outcome.retry_after_s
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                raise full(retry_after)
            if ended():
                raise Draining()
            await clock.wait(token, min(remaining, RECHECK_S))
    finally:
        await tickets.give_back(ticket)
        # The next in line may be waiting here: let it look now.
        queue.pulse.fire()
