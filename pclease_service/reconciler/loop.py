"""The reconciler's tick (see the package docstring for what one tick does)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from pclease_service.backends.base import Backend
from pclease_service.clock import Clock
from pclease_service.config import Settings
from pclease_service.contexts import lifecycle
from pclease_service.contexts.rules import planned_stop
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.instruments import Instruments, NoInstruments
from pclease_service.loops import tick_forever
from pclease_service.notify import Notifier
from pclease_service.reconciler.actions import ContextActions
from pclease_service.reconciler.calls import BackendCalls
from pclease_service.reconciler.sweep import Sweeper
from pclease_service.states import LIVE_CONTEXT_STATES, ContextState, LeaseState, StopKind
from pclease_service.store import contexts, leases
from pclease_service.store.contexts import ContextRecord

log = logging.getLogger("pclease.reconciler")

ACTOR = "reconciler"


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        backend: Backend,
        notifier: Notifier,
        clock: Clock,
        *,
        instruments: Instruments | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.notifier = notifier
        self.clock = clock
        self.calls = BackendCalls(
            backend, clock, settings.backend_call_timeout_s, instruments or NoInstruments()
        )
        self.actions = ContextActions(settings, db, self.calls, notifier, clock)
        self.sweeper = Sweeper(db, self.calls, clock)
        self.ticks = 0
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._born = clock.now()

    @property
    def backend(self) -> Backend:
        return self.calls.backend

    # -- loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick forever; a failing tick is logged with its traceback and the loop goes on."""
        await tick_forever(
            self.tick,
            wake=self.notifier.reconciler,
            interval_s=self.settings.reconcile_interval_s,
            clock=self.clock,
            log=log,
        )

    async def tick(self) -> None:
        self.ticks += 1
        await self._expire_leases()
        if self.sweeper.due(self.settings.orphan_sweep_interval_s):
            await self.sweep()
        live = await self.db.read(
            lambda tx: contexts.list_contexts(tx, states=LIVE_CONTEXT_STATES, limit=100_000)
        )
        starting = {c.id for c in live if c.state is ContextState.STARTING}
        self.actions.launched &= starting
        for context in live:
            if not self._busy(context.id):
                self._reconcile(context)

    async def sweep(self) -> None:
        """Adopt what the database lost track of; stop what nobody owns."""
        await self.sweeper.sweep(busy=self._busy)

    async def drain(self) -> None:
        """Wait for every backend call in flight (tests use this after ``tick``)."""
        while pending := [t for t in self._inflight.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self) -> None:
        """Cancel nothing half-way: finish calls in flight, then, for backends whose
        contexts must not outlive the service, revoke leases and stop every context."""
        await self.drain()
        if not self.backend.capabilities.stop_on_shutdown:
            return
        live = await self.db.read(
            lambda tx: contexts.list_contexts(tx, states=LIVE_CONTEXT_STATES, limit=100_000)
        )

        def stop_all(tx: Tx) -> None:
            for context in live:
                lifecycle.force_stopped(
                    tx,
                    context.id,
                    kind=StopKind.SHUTDOWN,
                    actor=ACTOR,
                    reason="the service is shutting down",
                )

        await self.db.write(stop_all)
        stopping = await self.db.read(
            lambda tx: contexts.list_contexts(tx, states=[ContextState.STOPPING], limit=100_000)
        )
        await asyncio.gather(*(self.actions.stop(c) for c in stopping), return_exceptions=True)

    # -- helpers --------------------------------------------------------------------------

    def _busy(self, context_id: str) -> bool:
        task = self._inflight.get(context_id)
        return task is not None and not task.done()

    def _launch(self, context_id: str, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("backend operation on context %s failed", context_id)

        self._inflight[context_id] = asyncio.create_task(guarded(), name=f"ctx-{context_id}")

    # -- expiry ---------------------------------------------------------------------------

    async def _expire_leases(self) -> None:
        def unit(tx: Tx) -> int:
            expired = 0
            for lease_id in leases.due_lease_ids(tx):
                lease = leases.get_lease(tx, lease_id)
                if lease is None:
                    continue
                reason = f"no heartbeat within its ttl of {lease.ttl_s:g} s"
                if leases.end_lease(tx, lease_id, LeaseState.EXPIRED, actor=ACTOR, reason=reason):
                    expired += 1
            return expired

        expired = await self.db.write(unit)
        if expired:
            log.info("expired %d lease(s)", expired)

    # -- per context ----------------------------------------------------------------------

    def _reconcile(self, context: ContextRecord) -> None:
        now = self.clock.now()
        profile = self.settings.profiles.get(context.profile)
        actions = self.actions
        state = context.state
        if state is ContextState.STARTING:
            if context.backend_handle is not None:
                self._launch(context.id, actions.poll_start(context))
            elif profile is None:
                reason = f"profile {context.profile!r} is no longer configured"
                self._launch(context.id, actions.fail(context, reason))
            elif self.sweeper.swept_at is not None or context.created_at >= self._born:
                # A context from before this process may have an instance the database
                # lost track of: start it only once a sweep had the chance to adopt that.
                self._launch(context.id, actions.start(context, profile))
        elif state in (ContextState.RUNNING, ContextState.IDLE):
            planned = planned_stop(context, profile)
            if planned is not None and planned.due(now):
                self._launch(context.id, actions.idle_stop(context, planned))
            elif actions.health_check_due(context, now):
                self._launch(context.id, actions.health_check(context))
        elif state is ContextState.STOPPING and actions.stop_due(context):
            self._launch(context.id, actions.stop(context))
