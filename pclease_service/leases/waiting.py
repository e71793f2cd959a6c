"""Waiting for capacity: first in, first out per profile, on the service's clock.

A request that finds its profile full takes a ticket in the profile's queue and tries
again whenever it is at the head and capacity may have been freed (a lease ended, a
context stopped: the queue's pulse), or every ``RECHECK_S`` for other replicas' changes,
until its ``wait_s`` has passed. The queue only orders requests that have already found
the profile full, so it never slows down the common case.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from pclease_service.clock import Clock
from pclease_service.errors import CapacityExhausted
from pclease_service.leases.grant import Grant
from pclease_service.notify import RECHECK_S, ProfileQueue


async def wait_in_line(
    queue: ProfileQueue,
    clock: Clock,
    wait_s: float,
    attempt: Callable[[], Awaitable[Grant]],
    full: Callable[[int], CapacityExhausted],
) -> Grant:
    """The first grant that got a lease; ``full(retry_after_s)`` is raised once ``wait_s``
    has passed without one."""
    deadline = clock.monotonic() + wait_s
    retry_after = 1
    if not queue.tickets:
        outcome = await attempt()
        if outcome.lease is not None:
            return outcome
        retry_after = outcome.retry_after_s
    ticket = queue.enter()
    try:
        while True:
            token = queue.pulse.token()
            if queue.is_head(ticket) and deadline - clock.monotonic() > 0:
                outcome = await attempt()
                if outcome.lease is not None:
                    return outcome
                retry_after = outcome.retry_after_s
            remaining = deadline - clock.monotonic()
            if remaining <= 0:
                raise full(retry_after)
            await clock.wait(token, min(remaining, RECHECK_S))
    finally:
        queue.leave(ticket)
