"""The one shape every background loop has."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pclease_service.clock import Clock


async def tick_forever(
    tick: Callable[[], Awaitable[None]],
    *,
    wake: asyncio.Event,
    interval_s: float,
    clock: Clock,
    log: logging.Logger,
) -> None:
    """Run ``tick`` every ``interval_s`` (on ``clock``) or as soon as ``wake`` is set.

    Cancellation ends the loop; any other error is logged with its traceback and the next
    tick runs as usual. (If the loop itself dies, the task's done-callback reports it.)
    """
    while True:
        wake.clear()
        try:
            await tick()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; retrying next tick", getattr(tick, "__qualname__", tick))
        await clock.wait(wake, interval_s)
