"""What the reconciler does to one context: start it, poll its start, check its health,
stop it (when idle, by force, at shutdown), fail it, and take over one a dead replica
hosted. Each runs as the context's one task in flight, under this replica's claim on it:
every backend call goes through :class:`~.calls.BackendCalls` with the claim's fence, and
every write of what it did passes :func:`~pclease_service.store.claims.hold` first."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TypeVar

from pclease_service.backends.base import (
    LABEL_CONTEXT_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_PROFILE,
    ContextSpec,
    Phase,
)
from pclease_service.clock import Clock
from pclease_service.config import Profile, Settings
from pclease_service.contexts import lifecycle
from pclease_service.contexts.rules import PlannedStop
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import BackendError
from pclease_service.notify import Notifier
from pclease_service.reconciler.calls import BackendCalls
from pclease_service.states import ContextState
from pclease_service.store import claims, contexts, events, replicas
from pclease_service.store.claims import Fence, FenceLost, fence_of
from pclease_service.store.contexts import ContextRecord

T = TypeVar("T")

log = logging.getLogger("pclease.reconciler")

ACTOR = "reconciler"


class ContextActions:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        calls: BackendCalls,
        notifier: Notifier,
        clock: Clock,
        *,
        replica: str,
    ) -> None:
        self.settings = settings
        self.replica = replica
        self.db = db
        self.calls = calls
        self.notifier = notifier
        self.clock = clock
        self._checked_at: dict[str, datetime] = {}
        self._stop_failures: dict[str, int] = {}
        # A failed stop is retried no sooner than this (clock.monotonic()), backing off.
        self._retry_stop_at: dict[str, float] = {}
        #: Contexts whose start this process launched and that are still starting.
        self.launched: set[str] = set()

    def spec_for(self, context: ContextRecord, profile: Profile) -> ContextSpec:
        labels = {
            **profile.labels,
            LABEL_MANAGED_BY: "pclease",
            LABEL_INSTANCE: self.settings.instance_name,
            LABEL_CONTEXT_ID: context.id,
            LABEL_PROFILE: profile.name,
        }
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
            options=self.calls.backend.context_options(profile),
            fence=context.fence,
        )

    async def _fenced(self, fence: Fence, fn: Callable[[Tx], T]) -> T:
        """Write ``fn`` only while ``fence`` is still the context's claim."""

        def unit(tx: Tx) -> T:
            claims.hold(tx, fence)
            return fn(tx)

        return await self.db.write(unit)

    def health_check_due(self, context: ContextRecord, now: datetime) -> bool:
        checked = self._checked_at.get(context.id)
        interval = timedelta(seconds=self.settings.health_check_interval_s)
        if checked is None or now - checked >= interval:
            self._checked_at[context.id] = now
            return True
        return False

    def stop_due(self, context: ContextRecord) -> bool:
        """False while a failed stop of the context backs off."""
        retry_at = self._retry_stop_at.get(context.id)
        return retry_at is None or self.clock.monotonic() >= retry_at

    async def start(self, context: ContextRecord, profile: Profile) -> None:
        # The tick's snapshot may predate the previous start's checkpoint (a task can finish
        # between the snapshot and this launch): look again, and never start one twice.
        if context.id in self.launched:
            return
        current = await self.db.read(lambda tx: contexts.get_context(tx, context.id))
        if (
            current is None
            or current.state is not ContextState.STARTING
            or current.backend_handle is not None
        ):
            return
        self.launched.add(context.id)
        fence = fence_of(context)
        spec = self.spec_for(context, profile)
        log.info(
            "starting context %s (profile %s, fence %d)", context.id, profile.name, fence.token
        )
        try:
            handle = await self.calls.start(spec, fence)
        except BackendError as exc:
            await self.fail(context, f"start failed: {exc}")
            return
        host = self.replica if self.calls.backend.capabilities.hosted else None
        try:
            await self._fenced(
                fence, lambda tx: contexts.save_handle(tx, context.id, handle, host=host)
            )
        except FenceLost:
            # Deposed while starting: the context is someone else's now. What this start
            # launched is ours alone unless the new holder adopted it; if not, stop it.
            now = await self.db.read(lambda tx: contexts.get_context(tx, context.id))
            recorded = now.backend_handle if now is not None else None
            if recorded is None or dict(recorded) != dict(handle):
                log.warning(
                    "lost context %s while starting it; stopping what it launched", context.id
                )
                await self.calls.stop(handle, None)
            raise
        self.notifier.reconciler.set()

    async def poll_start(self, context: ContextRecord) -> None:
        assert context.backend_handle is not None
        fence = fence_of(context)
        try:
            observation = await self.calls.status(context.backend_handle, fence)
        except BackendError as exc:
            observation = None
            message = str(exc)
        if observation is not None and observation.phase is Phase.RUNNING:
            await self._fenced(fence, lambda tx: lifecycle.started(tx, context.id, actor=ACTOR))
            log.info("context %s is running", context.id)
            return
        if observation is not None and observation.phase in (Phase.FAILED, Phase.STOPPED):
            await self.fail(context, observation.message or f"the instance {observation.phase}")
            return
        if observation is not None:
            message = observation.message or "starting"
        waited = (self.clock.now() - context.created_at).total_seconds()
        if waited >= self.settings.start_timeout_s:
            await self.fail(
                context,
                f"did not start within start_timeout_s={self.settings.start_timeout_s:g} "
                f"(last status: {message})",
            )
        elif message != context.status_message:
            await self._fenced(
                fence, lambda tx: contexts.set_status_message(tx, context.id, message)
            )

    async def health_check(self, context: ContextRecord) -> None:
        if context.backend_handle is None:
            return
        try:
            observation = await self.calls.status(context.backend_handle, fence_of(context))
        except BackendError as exc:
            log.warning("health check of context %s failed: %s", context.id, exc)
            return
        if observation.phase in (Phase.FAILED, Phase.STOPPED):
            await self.fail(context, observation.message or f"the instance {observation.phase}")

    async def fail(self, context: ContextRecord, message: str) -> None:
        log.warning("context %s failed: %s", context.id, message)
        fence = fence_of(context)
        await self._fenced(fence, lambda tx: lifecycle.failed(tx, context.id, message, actor=ACTOR))
        self._checked_at.pop(context.id, None)
        if context.backend_handle is not None and self.calls.backend.reaches(
            context.backend_handle
        ):
            # Whatever is left of it still costs money. (Failing is this replica's last
            # decision on the context; the stop is the cleanup that decision owns.)
            try:
                await self.calls.stop(context.backend_handle, None)
            except BackendError as exc:
                log.warning("cleanup stop of failed context %s failed: %s", context.id, exc)

    async def idle_stop(self, context: ContextRecord, planned: PlannedStop) -> None:
        """Stop an idle context whose time has come, unless a lease arrived meanwhile (the
        fence in :func:`~pclease_service.store.contexts.begin_idle_stop`)."""
        stopping = await self._fenced(
            fence_of(context),
            lambda tx: contexts.begin_idle_stop(
                tx,
                context.id,
                idle_since=planned.idle_since,
                kind=planned.kind,
                actor=ACTOR,
                reason=planned.reason,
            ),
        )
        if stopping is not None:
            await self.stop(stopping)

    async def stop(self, context: ContextRecord) -> None:
        fence = fence_of(context)
        if context.backend_handle is not None:
            try:
                await self.calls.stop(context.backend_handle, fence)
            except BackendError as exc:
                failures = self._stop_failures.get(context.id, 0) + 1
                self._stop_failures[context.id] = failures
                message = f"stop failed ({failures}x), retrying: {exc}"
                log.warning("context %s: %s", context.id, message)
                await self._fenced(
                    fence, lambda tx: contexts.set_status_message(tx, context.id, message)
                )
                backoff = self.settings.reconcile_interval_s * 2 ** min(failures, 6)
                self._retry_stop_at[context.id] = self.clock.monotonic() + min(30.0, backoff)
                return
        self._stop_failures.pop(context.id, None)
        self._retry_stop_at.pop(context.id, None)
        self._checked_at.pop(context.id, None)
        await self._fenced(fence, lambda tx: contexts.mark_stopped(tx, context.id, actor=ACTOR))
        log.info("context %s stopped", context.id)

    async def take_over(self, context: ContextRecord) -> None:
        """A context hosted by a replica that is not alive any more: adopt its worker if
        this replica can reach it, or settle the context (a stop is done, anything else
        failed) so that nothing waits for a host that is gone."""
        fence = fence_of(context)
        host = context.host_replica
        handle = context.backend_handle
        if handle is not None and self.calls.backend.reaches(handle):

            def adopt(tx: Tx) -> None:
                claims.set_host(tx, fence, self.replica)
                events.record_event(
                    tx,
                    kind="context",
                    actor=ACTOR,
                    context_id=context.id,
                    reason=f"replica {self.replica} took the context over from replica "
                    f"{host}, which is gone",
                )

            await self.db.write(adopt)
            log.info("took context %s over from replica %s", context.id, host)
            return
        if host is not None:
            last_seen = await self.db.read(lambda tx: replicas.last_heartbeat(tx, host))
            silent_s = None if last_seen is None else (self.clock.now() - last_seen).total_seconds()
            if silent_s is not None and silent_s < self.settings.replica_ttl_s:
                return  # a host that stopped just now may be restarting: give it its time
        why = (
            f"its host replica {host} is gone and its worker cannot be reached from "
            f"replica {self.replica}"
        )
        if context.state is ContextState.STOPPING:

            def settle(tx: Tx) -> None:
                claims.hold(tx, fence)
                contexts.mark_stopped(tx, context.id, actor=ACTOR, reason=f"stopped: {why}")

            await self.db.write(settle)
            log.warning("context %s: marked stopped, %s", context.id, why)
            return
        await self._fenced(fence, lambda tx: lifecycle.failed(tx, context.id, why, actor=ACTOR))
        log.warning("context %s failed: %s", context.id, why)
