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
from pclease_service.states import ContextState, LeaseState, StopKind
from pclease_service.store import claims, contexts, leases, replicas
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
        replica: str = "pclease",
        instruments: Instruments | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.notifier = notifier
        self.clock = clock
        self.replica = replica
        self.calls = BackendCalls(
            backend,
            clock,
            settings.backend_call_timeout_s,
            instruments or NoInstruments(),
            fence_check=self._fence_held,
        )
        self.actions = ContextActions(settings, db, self.calls, notifier, clock, replica=replica)
        self.sweeper = Sweeper(
            db, self.calls, clock, replica=replica, hosted=backend.capabilities.hosted
        )
        self.ticks = 0
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._born = clock.now()
        #: While set, no new claims are taken (the replica is draining).
        self.draining = False
        #: The contexts this replica held at its last tick, and since when (monotonic).
        self.held: dict[str, float] = {}
        #: Whether the last tick saw the service as a whole being shut down.
        self.shutting_down = False

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
        held = await self._claim()
        if self.sweeper.due(self.settings.orphan_sweep_interval_s) or self._must_sweep(held):
            await self.sweeper.sweep(busy=self._busy)
        starting = {c.id for c in held if c.state is ContextState.STARTING}
        self.actions.launched &= starting
        for context in held:
            if not self._busy(context.id):
                self._reconcile(context)

    async def _claim(self) -> list[ContextRecord]:
        hosted = self.backend.capabilities.hosted
        take_new = not self.draining

        def unit(tx: Tx) -> tuple[list[ContextRecord], bool]:
            held = claims.claim_contexts(
                tx,
                self.replica,
                ttl_s=self.settings.replica_ttl_s,
                hosted=hosted,
                take_new=take_new,
            )
            return held, replicas.shutdown_requested(tx) is not None

        held, self.shutting_down = await self.db.write(unit)
        now = self.clock.monotonic()
        self.held = {c.id: self.held.get(c.id, now) for c in held}
        if self.shutting_down and self.backend.capabilities.stop_on_shutdown:
            await self._stop_for_shutdown(held)
            held = await self.db.read(
                lambda tx: [
                    c
                    for c in (contexts.get_context(tx, cid) for cid in self.held)
                    if c is not None and c.claimed_by == self.replica
                ]
            )
        return held

    def _must_sweep(self, held: list[ContextRecord]) -> bool:
        """A context that another replica may have begun starting (it was claimed before)
        is started only after a sweep since this replica claimed it had the chance to
        adopt what that start launched."""
        swept = self.sweeper.swept_at
        return any(
            c.state is ContextState.STARTING
            and c.backend_handle is None
            and c.fence > 1
            and (swept is None or swept < self.held[c.id])
            for c in held
        )

    async def _fence_held(self, fence: claims.Fence) -> bool:
        return await self.db.read(lambda tx: claims.still_held(tx, fence))

    async def sweep(self) -> None:
        """Claim what is free, then adopt what the database lost track of (of the contexts
        this replica holds) and stop what nobody owns."""
        await self._claim()
        await self.sweeper.sweep(busy=self._busy)

    async def drain(self) -> None:
        """Wait for every backend call in flight (tests use this after ``tick``)."""
        while pending := [t for t in self._inflight.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self) -> None:
        """This replica exits: cancel nothing half-way (finish calls in flight), then give
        up its claims so another replica takes its contexts over at once. Leases and
        contexts are left as they are, unless the service as a whole is being shut down
        (``pclease shutdown``): then, for backends whose contexts must not outlive it, the
        contexts this replica holds (the workers it hosts) are stopped first."""
        self.draining = True
        await self.drain()
        try:
            if self.backend.capabilities.stop_on_shutdown:
                held = await self.db.write(
                    lambda tx: (
                        claims.claim_contexts(
                            tx,
                            self.replica,
                            ttl_s=self.settings.replica_ttl_s,
                            hosted=self.backend.capabilities.hosted,
                            take_new=False,
                        )
                        if replicas.shutdown_requested(tx) is not None
                        else []
                    )
                )
                await self._stop_for_shutdown(held)
        finally:
            released = await self.db.write(lambda tx: claims.release_claims(tx, self.replica))
            if released:
                log.info("gave up the claims on %d context(s) for other replicas", released)

    async def _stop_for_shutdown(self, held: list[ContextRecord]) -> None:
        reason = "the service is shutting down"

        def unit(tx: Tx) -> list[ContextRecord]:
            stopping = []
            for context in held:
                try:
                    claims.hold(tx, claims.fence_of(context))
                except claims.FenceLost:
                    continue
                row = lifecycle.force_stopped(
                    tx, context.id, kind=StopKind.SHUTDOWN, actor=ACTOR, reason=reason
                )
                current = row or contexts.get_context(tx, context.id)
                if current is not None and current.state is ContextState.STOPPING:
                    stopping.append(current)
            return stopping

        if not held:
            return
        stopping = await self.db.write(unit)
        pending = [c for c in stopping if not self._busy(c.id)]
        await asyncio.gather(*(self.actions.stop(c) for c in pending), return_exceptions=True)

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
            except claims.FenceLost as exc:
                log.info("context %s: %s", context_id, exc)
            except Exception:
                log.exception("backend operation on context %s failed", context_id)

        self._inflight[context_id] = asyncio.create_task(guarded(), name=f"ctx-{context_id}")

    # -- expiry ---------------------------------------------------------------------------

    async def _expire_leases(self) -> None:
        def unit(tx: Tx) -> int:
            expired = 0
            grace_s = self.settings.lease_expiry_grace_s
            for lease_id in leases.due_lease_ids(tx, grace_s=grace_s):
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
        if context.host_replica is not None and context.host_replica != self.replica:
            # Claimable only because its host is gone (see store.claims).
            self._launch(context.id, actions.take_over(context))
        elif state is ContextState.STARTING:
            if context.backend_handle is not None:
                self._launch(context.id, actions.poll_start(context))
            elif profile is None:
                reason = f"profile {context.profile!r} is no longer configured"
                self._launch(context.id, actions.fail(context, reason))
            elif not self._must_sweep([context]) and (
                self.sweeper.swept_at is not None or context.created_at >= self._born
            ):
                # A context from before this process, or one another replica held before,
                # may have an instance the database lost track of: start it only once a
                # sweep had the chance to adopt that.
                self._launch(context.id, actions.start(context, profile))
        elif state in (ContextState.RUNNING, ContextState.IDLE):
            planned = planned_stop(context, profile)
            if planned is not None and planned.due(now):
                self._launch(context.id, actions.idle_stop(context, planned))
            elif actions.health_check_due(context, now):
                self._launch(context.id, actions.health_check(context))
        elif state is ContextState.STOPPING and actions.stop_due(context):
            self._launch(context.id, actions.stop(context))
