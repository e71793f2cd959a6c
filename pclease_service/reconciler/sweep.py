"""The sweep: compare what the backend reports with the database.

Instances of known contexts whose start checkpoint was lost are adopted (their handle is
saved); instances of contexts that ended, second instances of one context, and instances
labelled for this deployment that the database does not know are stopped. Of the live
contexts, only those this replica claims are adopted or trimmed (under the claim's fence):
another replica's are its own business.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from pclease_service.backends.base import Observed, Phase
from pclease_service.clock import Clock
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import BackendError
from pclease_service.reconciler.calls import BackendCalls
from pclease_service.store import claims, contexts, events
from pclease_service.store.claims import FenceLost, fence_of
from pclease_service.store.contexts import ContextRecord

log = logging.getLogger("pclease.reconciler")

ACTOR = "reconciler"


class Sweeper:
    def __init__(
        self, db: Database, calls: BackendCalls, clock: Clock, *, replica: str, hosted: bool
    ) -> None:
        self.replica = replica
        self.hosted = hosted
        self.db = db
        self.calls = calls
        self.clock = clock
        #: When the last successful sweep ran (clock.monotonic()), None before the first.
        self.swept_at: float | None = None
        #: The last sweep's failure (None after a successful one) and when the backend
        #: was last listed: what /readyz reports for backends it must not call itself.
        self.error: str | None = None
        self.listed_at: datetime | None = None

    def due(self, interval_s: float) -> bool:
        return self.swept_at is None or self.clock.monotonic() - self.swept_at >= interval_s

    async def sweep(self, busy: Callable[[str], bool]) -> None:
        """Adopt what the database lost track of; stop what nobody owns. Contexts for
        which ``busy`` is true (a backend call of theirs is in flight) are left alone."""
        try:
            observed = await self.calls.list()
        except BackendError as exc:
            log.warning("cannot list the backend's contexts: %s", exc)
            self.error = str(exc)
            return
        self.error = None
        self.listed_at = self.clock.now()
        self.swept_at = self.clock.monotonic()
        ids = [o.context_id for o in observed if o.context_id]
        known = await self.db.read(lambda tx: {cid: contexts.get_context(tx, cid) for cid in ids})
        for item in observed:
            record = known.get(item.context_id) if item.context_id else None
            if item.context_id and busy(item.context_id):
                continue  # its start is still being recorded
            try:
                await self._sweep_one(item, record)
            except FenceLost:
                continue  # claimed by another replica since it was read

    async def _sweep_one(self, item: Observed, record: ContextRecord | None) -> None:
        if item.phase is Phase.STOPPED:
            return
        if record is not None and not record.state.is_terminal:
            if record.claimed_by != self.replica:
                return  # another replica acts on it
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
            await self.calls.stop(item.handle, None)
        except BackendError as exc:
            log.warning("could not stop orphaned instance %s: %s", dict(item.handle), exc)
            return
        if record is not None:
            await self.db.write(
                lambda tx: events.record_event(
                    tx,
                    kind="context",
                    actor=ACTOR,
                    context_id=record.id,
                    reason=f"stopped orphaned instance: {why}",
                )
            )

    def _adopt(self, tx: Tx, record: ContextRecord, item: Observed) -> None:
        claims.hold(tx, fence_of(record))
        host = self.replica if self.hosted else None
        contexts.save_handle(tx, record.id, item.handle, host=host)
        events.record_event(
            tx,
            kind="context",
            actor=ACTOR,
            context_id=record.id,
            reason="adopted the backend's instance of this context after a restart",
        )
