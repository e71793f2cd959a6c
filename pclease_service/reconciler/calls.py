"""Every backend lifecycle call the reconciler makes, in one place.

Each call is bounded by ``backend_call_timeout_s`` on the service's clock and recorded in
the instruments (latency, and failures by operation). A call that times out is a
:class:`~pclease_service.errors.BackendError` like any other failure.

Calls on a context carry the claim's :class:`~pclease_service.store.claims.Fence`: right
before the backend is called, the claim is checked to be still this replica's (one read),
and :class:`~pclease_service.store.claims.FenceLost` is raised instead of calling when it
is not. A start passes the fence on in ``ContextSpec.fence``. What the call did is then
recorded only through :func:`~pclease_service.store.claims.hold`, so a replica deposed
during the call writes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pclease_service.backends.base import Backend, ContextSpec, Handle, Observation, Observed
from pclease_service.clock import Clock, within
from pclease_service.errors import BackendError
from pclease_service.instruments import Instruments
from pclease_service.store.claims import Fence, FenceLost

T = TypeVar("T")

#: Whether a fence is still the context's current claim.
FenceCheck = Callable[[Fence], Awaitable[bool]]


async def _always(fence: Fence) -> bool:
    return True


class BackendCalls:
    def __init__(
        self,
        backend: Backend,
        clock: Clock,
        timeout_s: float,
        instruments: Instruments,
        *,
        fence_check: FenceCheck = _always,
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.timeout_s = timeout_s
        self.instruments = instruments
        self.fence_check = fence_check

    async def start(self, spec: ContextSpec, fence: Fence) -> Handle:
        await self._check(fence)
        spec = dataclasses.replace(spec, fence=fence.token)
        return await self._call("start", self.backend.start(spec))

    async def status(self, handle: Handle, fence: Fence) -> Observation:
        await self._check(fence)
        return await self._call("status", self.backend.status(handle))

    async def stop(self, handle: Handle, fence: Fence | None) -> None:
        """``fence`` is None only for instances no live context owns (the sweep)."""
        if fence is not None:
            await self._check(fence)
        await self._call("stop", self.backend.stop(handle))

    async def list(self) -> list[Observed]:
        return await self._call("list", self.backend.list())

    async def _check(self, fence: Fence) -> None:
        if not await self.fence_check(fence):
            raise FenceLost(
                f"replica {fence.replica} no longer holds context {fence.context_id} "
                f"(fence {fence.token}); not calling the backend"
            )

    async def _call(self, operation: str, call: Awaitable[T]) -> T:
        started = self.clock.monotonic()
        failed = False
        try:
            return await within(self.clock, self.timeout_s, call)
        except TimeoutError:
            failed = True
            raise BackendError(
                f"the {self.backend.kind} backend did not answer {operation} within "
                f"{self.timeout_s:g} s"
            ) from None
        except Exception:
            failed = True
            raise
        finally:
            self.instruments.backend_call(
                operation, self.clock.monotonic() - started, failed=failed
            )
