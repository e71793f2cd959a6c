"""What the reconciler does to one context: start it, poll its start, check its health,
stop it (when idle, by force, at shutdown) and fail it. Each runs as the context's one
task in flight; every backend call goes through :class:`~.calls.BackendCalls`."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

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
from pclease_service.errors import BackendError
from pclease_service.notify import Notifier
from pclease_service.reconciler.calls import BackendCalls
from pclease_service.states import ContextState
from pclease_service.store import contexts
from pclease_service.store.contexts import ContextRecord

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
    ) -> None:
        self.settings = settings
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
        )

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
        spec = self.spec_for(context, profile)
        log.info("starting context %s (profile %s)", context.id, profile.name)
        try:
            handle = await self.calls.start(spec)
        except BackendError as exc:
            await self.fail(context, f"start failed: {exc}")
            return
        await self.db.write(lambda tx: contexts.save_handle(tx, context.id, handle))
        self.notifier.reconciler.set()

    async def poll_start(self, context: ContextRecord) -> None:
        assert context.backend_handle is not None
        try:
            observation = await self.calls.status(context.backend_handle)
        except BackendError as exc:
            observation = None
            message = str(exc)
        if observation is not None and observation.phase is Phase.RUNNING:
            await self.db.write(lambda tx: lifecycle.started(tx, context.id, actor=ACTOR))
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
            await self.db.write(lambda tx: contexts.set_status_message(tx, context.id, message))

    async def health_check(self, context: ContextRecord) -> None:
        if context.backend_handle is None:
            return
        try:
            observation = await self.calls.status(context.backend_handle)
        except BackendError as exc:
            log.warning("health check of context %s failed: %s", context.id, exc)
            return
        if observation.phase in (Phase.FAILED, Phase.STOPPED):
            await self.fail(context, observation.message or f"the instance {observation.phase}")

    async def fail(self, context: ContextRecord, message: str) -> None:
        log.warning("context %s failed: %s", context.id, message)
        await self.db.write(lambda tx: lifecycle.failed(tx, context.id, message, actor=ACTOR))
        self._checked_at.pop(context.id, None)
        if context.backend_handle is not None:
            # Whatever is left of it still costs money.
            try:
                await self.calls.stop(context.backend_handle)
            except BackendError as exc:
                log.warning("cleanup stop of failed context %s failed: %s", context.id, exc)

    async def idle_stop(self, context: ContextRecord, planned: PlannedStop) -> None:
        """Stop an idle context whose time has come, unless a lease arrived meanwhile (the
        fence in :func:`~pclease_service.store.contexts.begin_idle_stop`)."""
        stopping = await self.db.write(
            lambda tx: contexts.begin_idle_stop(
                tx,
                context.id,
                idle_since=planned.idle_since,
                kind=planned.kind,
                actor=ACTOR,
                reason=planned.reason,
            )
        )
        if stopping is not None:
            await self.stop(stopping)

    async def stop(self, context: ContextRecord) -> None:
        if context.backend_handle is not None:
            try:
                await self.calls.stop(context.backend_handle)
            except BackendError as exc:
                failures = self._stop_failures.get(context.id, 0) + 1
                self._stop_failures[context.id] = failures
                message = f"stop failed ({failures}x), retrying: {exc}"
                log.warning("context %s: %s", context.id, message)
                await self.db.write(lambda tx: contexts.set_status_message(tx, context.id, message))
                backoff = self.settings.reconcile_interval_s * 2 ** min(failures, 6)
                self._retry_stop_at[context.id] = self.clock.monotonic() + min(30.0, backoff)
                return
        self._stop_failures.pop(context.id, None)
        self._retry_stop_at.pop(context.id, None)
        self._checked_at.pop(context.id, None)
        await self.db.write(lambda tx: contexts.mark_stopped(tx, context.id, actor=ACTOR))
        log.info("context %s stopped", context.id)
