"""The one shape every background loop has."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


async def tick_forever(
    tick: Callable[[], Awaitable[None]],
    *,
    wake: asyncio.Event,
    interval_s: float,
    log: logging.Logger,
) -> None:
    """Run ``tick`` every ``interval_s`` or as soon as ``wake`` is set.

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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval_s)
