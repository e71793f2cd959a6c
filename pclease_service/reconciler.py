"""The only component that talks to the backend.

API calls only change rows (a new ``starting`` context, a lease ended, a context marked
``stopping``) and wake the reconciler. Each tick it makes the backend match the database:

1. expire leases whose TTL ran out;
2. compare what the backend reports with the database (on the first tick and then every
   ``orphan_sweep_interval_s``): adopt instances of known contexts whose start checkpoint
   was lost, stop instances of contexts that ended or that it never knew;
3. for each live context: launch starts, poll starting ones, health-check running ones,
   stop idle ones whose grace has passed, carry out stops.

Backend calls run as tasks (at most one per context at a time) with timeouts, so a slow
start never delays expiry or another profile's stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import TypeVar

from pclease_service import metrics, store
from pclease_service.backends.base import (
    LABEL_CONTEXT_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_PROFILE,
    Backend,
    BackendError,
    ContextSpec,
    Observed,
    Phase,
)
from pclease_service.clock import Clock
from pclease_service.config import BackendKind, Profile, Settings
from pclease_service.db.session import Database
from pclease_service.loops import tick_forever
from pclease_service.notify import Notifier
from pclease_service.states import LIVE_CONTEXT_STATES, ContextState, LeaseState
from pclease_service.store import ContextRecord, Tx

log = logging.getLogger("pclease.reconciler")

ACTOR = "reconciler"
T = TypeVar("T")


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        backend: Backend,
        notifier: Notifier,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.db = db
        self.backend = backend
        self.notifier = notifier
        self.clock = clock
        self.ticks = 0
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._swept_at: float | None = None
        self._born = clock.now()
        self._checked_at: dict[str, datetime] = {}
        self._stop_failures: dict[str, int] = {}
        self._launched: set[str] = set()
        #: The last sweep's failure (None after a successful one) and when the backend
        #: was last listed: what /readyz reports for backends it must not call itself.
        self.sweep_error: str | None = None
        self.listed_at: datetime | None = None

    # -- loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick forever; a failing tick is logged with its traceback and the loop goes on."""
        await tick_forever(
            self.tick,
            wake=self.notifier.reconciler,
            interval_s=self.settings.reconcile_interval_s,
            log=log,
        )

    async def tick(self) -> None:
        self.ticks += 1
        await self._expire_leases()
        loop_now = asyncio.get_running_loop().time()
        if self._swept_at is None or loop_now - self._swept_at >= (
            self.settings.orphan_sweep_interval_s
        ):
            await self.sweep()
        live = await self.db.read(
            lambda tx: store.list_contexts(tx, states=LIVE_CONTEXT_STATES, limit=100_000)
        )
        self._launched &= {context.id for context in live if context.state.value == "starting"}
        for context in live:
            task = self._inflight.get(context.id)
            if task is not None and not task.done():
                continue
            self._reconcile(context)

    async def drain(self) -> None:
        """Wait for every backend call in flight (tests use this after ``tick``)."""
        while pending := [t for t in self._inflight.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self) -> None:
        """Cancel nothing half-way: finish calls in flight, then, for backends whose
        contexts must not outlive the service, revoke leases and stop every context."""
        await self.drain()
        if not self.backend.stop_on_shutdown:
            return
        live = await self.db.read(
            lambda tx: store.list_contexts(tx, states=LIVE_CONTEXT_STATES, limit=100_000)
        )

        def stop_all(tx: Tx) -> None:
            for context in live:
                store.force_stop(tx, context.id, actor=ACTOR, reason="the service is shutting down")

        await self.db.write(stop_all)
        stopping = await self.db.read(
            lambda tx: store.list_contexts(tx, states=[ContextState.STOPPING], limit=100_000)
        )
        await asyncio.gather(*(self._stop(c) for c in stopping), return_exceptions=True)

    # -- helpers --------------------------------------------------------------------------

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        try:
            return await metrics.backend_call(
                what, asyncio.wait_for(call, self.settings.backend_call_timeout_s)
            )
        except TimeoutError:
            raise BackendError(
                f"the {self.backend.kind} backend did not answer {what} within "
                f"{self.settings.backend_call_timeout_s:g} s"
            ) from None

    def _launch(self, context_id: str, coro: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("backend operation on context %s failed", context_id)

        self._inflight[context_id] = asyncio.create_task(guarded(), name=f"ctx-{context_id}")

    def profile_of(self, context: ContextRecord) -> Profile | None:
        return self.settings.profiles.get(context.profile)

    def spec_for(self, context: ContextRecord, profile: Profile) -> ContextSpec:
        labels = {
            **profile.labels,
            LABEL_MANAGED_BY: "pclease",
            LABEL_INSTANCE: self.settings.instance_name,
            LABEL_CONTEXT_ID: context.id,
            LABEL_PROFILE: profile.name,
        }
        if self.settings.backend is BackendKind.POLARS_CLOUD:
            options = profile.polars_cloud.model_dump()
        else:
            options = profile.local.model_dump()
        return ContextSpec(
            context_id=context.id,
            profile=profile.name,
            cpus=profile.cpus,
            memory_gb=profile.memory_gb,
            cluster_size=profile.cluster_size,
            instance_type=profile.instance_type,
            storage_gb=profile.storage_gb,
            workspace=profile.workspace,
            labels=labels,
            options=options,
        )

    # -- expiry ---------------------------------------------------------------------------

    async def _expire_leases(self) -> None:
        def unit(tx: Tx) -> int:
            expired = 0
            for lease_id in store.due_lease_ids(tx):
                lease = store.get_lease(tx, lease_id)
                if lease is None:
                    continue
                reason = f"no heartbeat within its ttl of {lease.ttl_s:g} s"
                if store.end_lease(tx, lease_id, LeaseState.EXPIRED, actor=ACTOR, reason=reason):
                    expired += 1
            return expired

        expired = await self.db.write(unit)
        if expired:
            log.info("expired %d lease(s)", expired)

    # -- sweep ----------------------------------------------------------------------------

    async def sweep(self) -> None:
        """Adopt what the database lost track of; stop what nobody owns."""
        try:
            observed = await self._call("list", self.backend.list())
        except BackendError as exc:
            log.warning("cannot list the backend's contexts: %s", exc)
            self.sweep_error = str(exc)
            return
        self.sweep_error = None
        self.listed_at = self.clock.now()
        self._swept_at = asyncio.get_running_loop().time()
        ids = [o.context_id for o in observed if o.context_id]
        known = await self.db.read(lambda tx: {cid: store.get_context(tx, cid) for cid in ids})
        for item in observed:
            record = known.get(item.context_id) if item.context_id else None
            task = self._inflight.get(item.context_id or "")
            if task is not None and not task.done():
                continue  # its start is still being recorded
            await self._sweep_one(item, record)

    async def _sweep_one(self, item: Observed, record: ContextRecord | None) -> None:
        if item.phase in (Phase.STOPPED,):
            return
        if record is not None and not record.state.is_terminal:
            if record.backend_handle is None:
                await self.db.write(lambda tx: self._adopt(tx, record, item))
                return
            if dict(record.backend_handle) == dict(item.handle):
                return
            why = f"a second instance for context {record.id}; keeping the recorded one"
        elif record is None:
            why = "an instance labelled for this deployment that the database does not know"
        else:
            why = f"an instance of context {record.id}, which is {record.state.value}"
        log.warning("stopping %s: %s", dict(item.handle), why)
        try:
            await self._call("stop", self.backend.stop(item.handle))
        except BackendError as exc:
            log.warning("could not stop orphaned instance %s: %s", dict(item.handle), exc)
            return
        if record is not None:
            await self.db.write(
                lambda tx: store.record_event(
                    tx,
                    kind="context",
                    actor=ACTOR,
                    context_id=record.id,
                    reason=f"stopped orphaned instance: {why}",
                )
            )

    @staticmethod
    def _adopt(tx: Tx, record: ContextRecord, item: Observed) -> None:
        store.save_handle(tx, record.id, item.handle)
        store.record_event(
            tx,
            kind="context",
            actor=ACTOR,
            context_id=record.id,
            reason="adopted the backend's instance of this context after a restart",
        )

    # -- per context ----------------------------------------------------------------------

    def _reconcile(self, context: ContextRecord) -> None:
        now = self.clock.now()
        profile = self.profile_of(context)
        state = context.state
        if state is ContextState.STARTING:
            if context.backend_handle is None:
                if profile is None:
                    self._launch(
                        context.id,
                        self._fail(context, f"profile {context.profile!r} is no longer configured"),
                    )
                elif self._swept_at is not None or context.created_at >= self._born:
                    self._launch(context.id, self._start(context, profile))
            else:
                self._launch(context.id, self._poll_start(context))
        elif state in (ContextState.RUNNING, ContextState.IDLE):
            if state is ContextState.IDLE and self._idle_expired(context, profile, now):
                self._launch(context.id, self._idle_stop(context, profile, now))
                return
            checked = self._checked_at.get(context.id)
            interval = timedelta(seconds=self.settings.health_check_interval_s)
            if checked is None or now - checked >= interval:
                self._checked_at[context.id] = now
                self._launch(context.id, self._health_check(context))
        elif state is ContextState.STOPPING:
            self._launch(context.id, self._stop(context))

    @staticmethod
    def _idle_expired(context: ContextRecord, profile: Profile | None, now: datetime) -> bool:
        if profile is None:
            return True
        if profile.max_lifetime_s is not None and now - context.created_at >= timedelta(
            seconds=profile.max_lifetime_s
        ):
            return True
        assert context.idle_since is not None
        return now - context.idle_since >= timedelta(seconds=profile.idle_grace_s)

    async def _start(self, context: ContextRecord, profile: Profile) -> None:
        # The tick's snapshot may predate the previous start's checkpoint (a task can finish
        # between the snapshot and this launch): look again, and never start one twice.
        if context.id in self._launched:
            return
        current = await self.db.read(lambda tx: store.get_context(tx, context.id))
        if (
            current is None
            or current.state is not ContextState.STARTING
            or current.backend_handle is not None
        ):
            return
        self._launched.add(context.id)
        spec = self.spec_for(context, profile)
        log.info("starting context %s (profile %s)", context.id, profile.name)
        try:
            handle = await self._call("start", self.backend.start(spec))
        except BackendError as exc:
            await self._fail(context, f"start failed: {exc}")
            return
        await self.db.write(lambda tx: store.save_handle(tx, context.id, handle))
        self.notifier.reconciler.set()

    async def _poll_start(self, context: ContextRecord) -> None:
        assert context.backend_handle is not None
        try:
            observation = await self._call("status", self.backend.status(context.backend_handle))
        except BackendError as exc:
            observation = None
            message = str(exc)
        if observation is not None and observation.phase is Phase.RUNNING:
            await self.db.write(lambda tx: store.mark_started(tx, context.id, actor=ACTOR))
            log.info("context %s is running", context.id)
            return
        if observation is not None and observation.phase in (Phase.FAILED, Phase.STOPPED):
            await self._fail(context, observation.message or f"the instance {observation.phase}")
            return
        if observation is not None:
            message = observation.message or "starting"
        waited = (self.clock.now() - context.created_at).total_seconds()
        if waited >= self.settings.start_timeout_s:
            await self._fail(
                context,
                f"did not start within start_timeout_s={self.settings.start_timeout_s:g} "
                f"(last status: {message})",
            )
        elif message != context.status_message:
            await self.db.write(lambda tx: store.set_status_message(tx, context.id, message))

    async def _health_check(self, context: ContextRecord) -> None:
        if context.backend_handle is None:
            return
        try:
            observation = await self._call("status", self.backend.status(context.backend_handle))
        except BackendError as exc:
            log.warning("health check of context %s failed: %s", context.id, exc)
            return
        if observation.phase in (Phase.FAILED, Phase.STOPPED):
            await self._fail(context, observation.message or f"the instance {observation.phase}")

    async def _fail(self, context: ContextRecord, message: str) -> None:
        log.warning("context %s failed: %s", context.id, message)
        await self.db.write(lambda tx: store.fail_context(tx, context.id, message, actor=ACTOR))
        self._checked_at.pop(context.id, None)
        if context.backend_handle is not None:
            # Whatever is left of it still costs money.
            try:
                await self._call("stop", self.backend.stop(context.backend_handle))
            except BackendError as exc:
                log.warning("cleanup stop of failed context %s failed: %s", context.id, exc)

    async def _idle_stop(
        self, context: ContextRecord, profile: Profile | None, now: datetime
    ) -> None:
        grace = profile.idle_grace_s if profile else 0.0
        if profile is None:
            reason = f"profile {context.profile!r} is no longer configured"
        elif profile.max_lifetime_s is not None and now - context.created_at >= timedelta(
            seconds=profile.max_lifetime_s
        ):
            reason = f"idle past its max_lifetime_s of {profile.max_lifetime_s:g}"
        else:
            reason = f"idle for its grace period of {grace:g} s"
        # The cutoff keeps the guard honest: if a lease made it running and it went idle
        # again since we looked, its new idle_since is later than the cutoff.
        cutoff = now if reason.startswith("idle past") else now - timedelta(seconds=grace)
        stopping = await self.db.write(
            lambda tx: store.begin_idle_stop(
                tx, context.id, idle_cutoff=cutoff, actor=ACTOR, reason=reason
            )
        )
        if stopping is not None:
            await self._stop(stopping)

    async def _stop(self, context: ContextRecord) -> None:
        if context.backend_handle is not None:
            try:
                await self._call("stop", self.backend.stop(context.backend_handle))
            except BackendError as exc:
                failures = self._stop_failures.get(context.id, 0) + 1
                self._stop_failures[context.id] = failures
                message = f"stop failed ({failures}x), retrying: {exc}"
                log.warning("context %s: %s", context.id, message)
                await self.db.write(lambda tx: store.set_status_message(tx, context.id, message))
                backoff = self.settings.reconcile_interval_s * 2 ** min(failures, 6)
                await asyncio.sleep(min(30.0, backoff))
                return
        self._stop_failures.pop(context.id, None)
        self._checked_at.pop(context.id, None)
        await self.db.write(lambda tx: store.mark_stopped(tx, context.id, actor=ACTOR))
        log.info("context %s stopped", context.id)
