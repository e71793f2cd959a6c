"""Every backend lifecycle call the reconciler makes, in one place.

Each call is bounded by ``backend_call_timeout_s`` on the service's clock and recorded in
the instruments (latency, and failures by operation). A call that times out is a
:class:`~pclease_service.errors.BackendError` like any other failure.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from pclease_service.backends.base import Backend, ContextSpec, Handle, Observation, Observed
from pclease_service.clock import Clock, within
from pclease_service.errors import BackendError
from pclease_service.instruments import Instruments

T = TypeVar("T")


class BackendCalls:
    def __init__(
        self, backend: Backend, clock: Clock, timeout_s: float, instruments: Instruments
    ) -> None:
        self.backend = backend
        self.clock = clock
        self.timeout_s = timeout_s
        self.instruments = instruments

    async def start(self, spec: ContextSpec) -> Handle:
        return await self._call("start", self.backend.start(spec))

    async def status(self, handle: Handle) -> Observation:
        return await self._call("status", self.backend.status(handle))

    async def stop(self, handle: Handle) -> None:
        await self._call("stop", self.backend.stop(handle))

    async def list(self) -> list[Observed]:
        return await self._call("list", self.backend.list())

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
