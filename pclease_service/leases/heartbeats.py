"""Heartbeats written behind: answered from memory, written in one batch per interval.

Every Airflow task heartbeats its lease every few seconds; written one transaction each,
heartbeats are most of what the database does. Instead, a replica keeps the active leases
it has lately read from the database (:class:`ActiveLeases`). A heartbeat on one of them,
from its owner, before its expiry, is answered at once: the new deadline goes into a
pending batch, and :meth:`ActiveLeases.flush` writes the batch every ``heartbeat_flush_s``
in one transaction (only onto leases still active, never moving an expiry back). The same
transaction reads back which of the leases used since the last flush are still active:
those stay trusted for ``trust_s``, the others are forgotten, so the next request on them
reads the database again.

What this costs, and what it does not:

- **A crash** (SIGKILL, power loss) loses the heartbeats acknowledged since the last flush,
  about ``heartbeat_flush_s`` of them (plus the time a batch takes to write): those
  leases keep the deadline of their previous heartbeat. A holder heartbeating at the
  advised interval (a third of its TTL) has two more before that deadline. Nothing else
  is written behind: a lease is granted, released or ended in its own transaction before
  the answer, as before.
- **An end made elsewhere** (another replica releases, revokes or expires a lease this one
  trusts) reaches this replica's answers at its next flush, and in any case within
  ``trust_s``; ends made here are seen at once (:meth:`ActiveLeases.forget` runs on every
  commit that changes a lease).
- **Expiry** waits twice ``heartbeat_flush_s`` past a lease's deadline in the database
  (``Settings.lease_expiry_grace_s``), so that a heartbeat acknowledged just before the
  deadline but not yet written is not taken for a missing one.

``heartbeat_flush_s = 0`` turns all of this off: every heartbeat is its own transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from time import monotonic

from pclease_service.clock import Clock
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.principals import Principal
from pclease_service.states import LeaseState
from pclease_service.store import leases
from pclease_service.store.leases import LeaseRecord

log = logging.getLogger("pclease.heartbeats")


@dataclass
class _Known:
    lease: LeaseRecord
    #: ``monotonic()`` when the database last showed the lease active
    confirmed: float


class ActiveLeases:
    """The active leases this replica may answer heartbeats and reads of from memory."""

    def __init__(self, db: Database, clock: Clock, *, flush_s: float) -> None:
        self.db = db
        self.clock = clock
        self.flush_s = flush_s
        #: How long a confirmation is trusted: a few flushes, so that leases in use are
        #: re-confirmed before it runs out.
        self.trust_s = max(2.0, 8 * flush_s)
        self._known: dict[str, _Known] = {}
        #: lease id -> (heartbeat_at, expires_at) acknowledged but not written yet
        self._pending: dict[str, tuple[datetime, datetime]] = {}
        #: leases answered from memory since the last flush: the flush re-confirms them
        self._used: set[str] = set()
        self._flushing = asyncio.Lock()
        #: leases whose heartbeat is being written through the database right now
        self._writing: dict[str, asyncio.Future[None]] = {}

    @property
    def enabled(self) -> bool:
        return self.flush_s > 0

    def __len__(self) -> int:
        return len(self._known)

    # -- what the database said ---------------------------------------------------------------

    def remember(self, lease: LeaseRecord) -> None:
        """``lease`` as a transaction just read or wrote it."""
        if not self.enabled:
            return
        if lease.state is LeaseState.ACTIVE:
            self._known[lease.id] = _Known(lease, monotonic())
        else:
            self.forget((lease.id,))

    def forget(self, lease_ids: Iterable[str]) -> None:
        """These leases changed in a committed transaction: read them afresh next time."""
        for lease_id in lease_ids:
            self._known.pop(lease_id, None)

    # -- answers from memory --------------------------------------------------------------

    def _trusted(self, principal: Principal, lease_id: str) -> LeaseRecord | None:
        known = self._known.get(lease_id)
        if known is None or monotonic() - known.confirmed > self.trust_s:
            return None
        lease = known.lease
        if lease.token_id != principal.token_id:  # others' (an admin's) read the database
            return None
        return lease

    def read(self, principal: Principal, lease_id: str) -> LeaseRecord | None:
        """The lease as its owner may read it now, or None: ask the database."""
        lease = self._trusted(principal, lease_id)
        if lease is not None:
            self._used.add(lease_id)
        return lease

    def beat(self, principal: Principal, lease_id: str) -> LeaseRecord | None:
        """Acknowledge a heartbeat from memory (written at the next flush), or None: the
        lease is not known active here, or its deadline passed; ask the database."""
        lease = self._trusted(principal, lease_id)
        if lease is None:
            return None
        now = self.clock.now()
        if lease.expires_at <= now:  # too late: the database decides (and expires it)
            return None
        expires_at = now + timedelta(seconds=lease.ttl_s)
        beaten = replace(lease, heartbeat_at=now, expires_at=max(expires_at, lease.expires_at))
        self._known[lease_id].lease = beaten
        self._pending[lease_id] = (now, beaten.expires_at)
        self._used.add(lease_id)
        return beaten

    async def heartbeat(
        self,
        principal: Principal,
        lease_id: str,
        through_database: Callable[[], Awaitable[LeaseRecord]],
    ) -> LeaseRecord:
        """A heartbeat from memory if it can be, else ``through_database`` (whose lease is
        remembered). While one such write runs for a lease, the lease's other heartbeats
        wait for it and are then answered from memory: a burst on leases this replica
        does not know yet (after a restart, say) costs one write per lease, not one each."""
        beaten = self.beat(principal, lease_id)
        if beaten is not None:
            return beaten
        running = self._writing.get(lease_id)
        if running is not None:
            await asyncio.shield(running)
            beaten = self.beat(principal, lease_id)
            if beaten is not None:
                return beaten
            return await through_database()
        done = asyncio.get_running_loop().create_future()
        self._writing[lease_id] = done
        try:
            lease = await through_database()
            self.remember(lease)
            return lease
        finally:
            del self._writing[lease_id]
            done.set_result(None)

    # -- writing --------------------------------------------------------------------------

    async def flush(self) -> None:
        """Write the pending heartbeats in one transaction and re-confirm the leases used
        since the last flush."""
        async with self._flushing:
            if not self._pending and not self._used:
                return
            pending, self._pending = self._pending, {}
            used, self._used = self._used, set()
            checked_at = monotonic()
            try:
                active = await self.db.write(lambda tx: _write(tx, pending, used | pending.keys()))
            except BaseException:
                # Not written: keep them for the next flush (newer heartbeats win).
                self._pending = {**pending, **self._pending}
                self._used |= used
                raise
        for lease_id in used | pending.keys():
            known = self._known.get(lease_id)
            if known is None:  # ended here meanwhile (forgotten on its commit)
                continue
            if lease_id in active:
                known.confirmed = max(known.confirmed, checked_at)
            else:
                del self._known[lease_id]
        # Leases nobody used lately (another replica may have ended them): no longer
        # trusted, and never re-confirmed unless used; read from the database next time.
        stale = [
            i for i, known in self._known.items() if checked_at - known.confirmed > self.trust_s
        ]
        for lease_id in stale:
            del self._known[lease_id]

    async def run(self) -> None:
        """Flush every ``flush_s`` until cancelled; then a last flush."""
        try:
            while True:
                await asyncio.sleep(self.flush_s)
                try:
                    await self.flush()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("writing heartbeats failed; retrying at the next flush")
        finally:
            if self._pending:
                await self.flush()


def _write(tx: Tx, pending: dict[str, tuple[datetime, datetime]], ids: Iterable[str]) -> set[str]:
    leases.write_heartbeats(tx, pending)
    return leases.still_active(tx, ids)
