"""An in-memory backend with failure knobs and inspectable state.

It starts nothing: a "context" is a dict entry. Tests use it to drive the lifecycle with an
injected clock, and ``backend = "memory"`` gives a dry-run service that needs no compute.

Knobs (plain attributes, change them at any time):

- ``boot_s``: how long a context reports ``starting`` (measured on the injected clock)
- ``fail_start``: ``start()`` raises :class:`BackendError`
- ``fail_after_launch``: the context launches, then reports ``failed``
- ``fail_stop``: ``stop()`` raises
- ``hang_s``: every call sleeps this long first (for timeout tests)
- ``query_gate``: an ``asyncio.Event`` every query waits for (to hold queries running)
- ``query_outcome``: what every query returns (it runs nothing)
- ``query_result``: bytes a successful collect query writes as its result file (none
  when None)
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from pclease_service.backends.base import (
    LABEL_CONTEXT_ID,
    Backend,
    ContextSpec,
    Handle,
    Observation,
    Observed,
    Phase,
    QueryOutcome,
    QuerySpec,
)
from pclease_service.clock import Clock, SystemClock
from pclease_service.errors import BackendError


@dataclass
class FakeContext:
    name: str
    spec: ContextSpec
    launched_at: datetime
    phase: Phase = Phase.STARTING
    stop_calls: int = 0
    labels: dict[str, str] = field(default_factory=dict)


class MemoryBackend(Backend):
    kind = "memory"

    def __init__(self, clock: Clock | None = None, boot_s: float = 0.0) -> None:
        self.clock = clock or SystemClock()
        self.boot_s = boot_s
        self.fail_start = False
        self.fail_after_launch = False
        self.fail_stop = False
        self.hang_s = 0.0
        self.contexts: dict[str, FakeContext] = {}
        self.calls: list[tuple[str, str]] = []
        self._names = itertools.count(1)
        self.query_gate: asyncio.Event | None = None
        self.query_outcome = QueryOutcome(ok=True, rows=0, result_bytes=0)
        self.query_result: bytes | None = None
        self.executed: list[QuerySpec] = []
        self.cancelled: list[str] = []

    # -- inspection helpers -------------------------------------------------------------
    @property
    def starts(self) -> int:
        return sum(1 for call, _ in self.calls if call == "start")

    def running(self) -> list[FakeContext]:
        return [c for c in self.contexts.values() if c.phase is not Phase.STOPPED]

    def crash(self, name: str, message: str = "instance crashed") -> None:
        """Make a context fail as if its machine had died."""
        self.contexts[name].phase = Phase.FAILED
        self.contexts[name].labels["failure"] = message

    def adopt_foreign(self, labels: dict[str, str]) -> str:
        """Add a running context nobody asked this backend for (an orphan)."""
        name = f"mem-{next(self._names)}"
        spec = ContextSpec(
            context_id=labels.get(LABEL_CONTEXT_ID, ""),
            profile="?",
            cpus=1,
            memory_gb=1,
            labels=labels,
        )
        self.contexts[name] = FakeContext(
            name, spec, self.clock.now(), Phase.RUNNING, labels=dict(labels)
        )
        return name

    # -- Backend ------------------------------------------------------------------------
    async def _maybe_hang(self) -> None:
        if self.hang_s:
            await asyncio.sleep(self.hang_s)

    async def start(self, spec: ContextSpec) -> Handle:
        await self._maybe_hang()
        self.calls.append(("start", spec.context_id))
        if self.fail_start:
            raise BackendError("start refused by the memory backend (fail_start is set)")
        name = f"mem-{next(self._names)}"
        self.contexts[name] = FakeContext(name, spec, self.clock.now(), labels=dict(spec.labels))
        return {"name": name}

    async def status(self, handle: Handle) -> Observation:
        await self._maybe_hang()
        ctx = self.contexts.get(str(handle["name"]))
        if ctx is None:
            return Observation(Phase.STOPPED, "the context no longer exists")
        if ctx.phase is Phase.STARTING:
            if self.fail_after_launch:
                ctx.phase = Phase.FAILED
                ctx.labels["failure"] = "boot failed (fail_after_launch is set)"
            elif self.clock.now() >= ctx.launched_at + timedelta(seconds=self.boot_s):
                ctx.phase = Phase.RUNNING
        return Observation(ctx.phase, ctx.labels.get("failure"))

    async def stop(self, handle: Handle) -> None:
        await self._maybe_hang()
        name = str(handle["name"])
        self.calls.append(("stop", name))
        if self.fail_stop:
            raise BackendError("stop refused by the memory backend (fail_stop is set)")
        ctx = self.contexts.get(name)
        if ctx is not None:
            ctx.stop_calls += 1
            ctx.phase = Phase.STOPPED

    async def list(self) -> list[Observed]:
        await self._maybe_hang()
        self.calls.append(("list", ""))
        return [
            Observed({"name": c.name}, c.phase, c.labels.get(LABEL_CONTEXT_ID))
            for c in self.contexts.values()
            if c.phase is not Phase.STOPPED
        ]

    async def execute(self, handle: Handle, query: QuerySpec) -> QueryOutcome:
        await self._maybe_hang()
        self.executed.append(query)
        ctx = self.contexts.get(str(handle["name"]))
        if ctx is None or ctx.phase is not Phase.RUNNING:
            raise BackendError("the context is not running")
        try:
            if self.query_gate is not None:
                await self.query_gate.wait()
        except asyncio.CancelledError:
            self.cancelled.append(query.query_id)
            raise
        if self.query_outcome.ok and query.result_path and self.query_result is not None:
            await asyncio.to_thread(Path(query.result_path).write_bytes, self.query_result)
        return self.query_outcome
