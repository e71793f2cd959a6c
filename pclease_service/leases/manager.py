"""What callers can do with leases: acquire, watch, heartbeat, release, revoke.

This is the layer the HTTP routes and the dashboard call. It checks input and ownership,
runs each step as one transaction through :class:`~pclease_service.db.session.Database`,
and waits (FIFO per profile) when a profile is at capacity. It never talks to a backend: a
new context is only a ``starting`` row here, and the reconciler starts it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError

from pclease_service.clock import Clock
from pclease_service.config import Profile, Settings
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import (
    BackendUnavailable,
    CapacityExhausted,
    Forbidden,
    InvalidInput,
    LeaseEnded,
    LeaseNotFound,
    PcleaseError,
    UnknownProfile,
)
from pclease_service.instruments import Instruments, NoInstruments
from pclease_service.leases.grant import Grant, LeaseAsk, Turn, allocate, join, replay
from pclease_service.leases.heartbeats import ActiveLeases
from pclease_service.leases.waiting import Tickets, wait_in_line
from pclease_service.notify import Notifier, long_poll
from pclease_service.principals import Principal
from pclease_service.quotas import QuotaBook
from pclease_service.states import LIVE_LEASE_STATES, LeaseState
from pclease_service.store import leases, waiting
from pclease_service.store.leases import LeaseRecord

# A ticket outlives its waiter's deadline by this much, in case the waiter cannot delete
# it (its replica dies: then it is dropped once the replica counts as gone).
_TICKET_MARGIN_S = 5.0


class _Tickets(Tickets):
    def __init__(self, manager: LeaseManager, profile: str) -> None:
        self.manager = manager
        self.profile = profile

    async def take(self, wait_s: float) -> int:
        m = self.manager
        return await m.db.write(
            lambda tx: waiting.take_ticket(
                tx,
                self.profile,
                replica=m.replica,
                expires_at=tx.now + timedelta(seconds=wait_s + _TICKET_MARGIN_S),
            )
        )

    async def give_back(self, ticket: int) -> None:
        await self.manager.db.write(lambda tx: waiting.drop_ticket(tx, ticket))


class LeaseManager:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        notifier: Notifier,
        clock: Clock,
        backend_kind: str,
        *,
        ready_check: Callable[[], Awaitable[str | None]] | None = None,
        instruments: Instruments | None = None,
        quotas: QuotaBook | None = None,
        replica: str = "pclease",
    ) -> None:
        self.settings = settings
        self.replica = replica
        self.db = db
        self.notifier = notifier
        self.clock = clock
        self.backend_kind = backend_kind
        # Says why the backend cannot start contexts now (bad credentials), or None.
        self.ready_check = ready_check
        self.instruments = instruments or NoInstruments()
        self.quotas = quotas or QuotaBook(settings.quotas)
        #: Heartbeats and reads of active leases answered from memory (see
        #: :mod:`pclease_service.leases.heartbeats`); its ``run`` is the service's to start.
        self.active = ActiveLeases(db, clock, flush_s=settings.heartbeat_flush_s)

    # -- acquire --------------------------------------------------------------------------

    def _profile(self, name: str) -> Profile:
        profile = self.settings.profiles.get(name)
        if profile is None:
            raise UnknownProfile(name, list(self.settings.profiles))
        return profile

    def _check_ttl(self, ttl_s: float | None) -> float:
        s = self.settings
        if ttl_s is None:
            return s.lease_ttl_s
        if not s.lease_ttl_min_s <= ttl_s <= s.lease_ttl_max_s:
            raise InvalidInput(
                f"ttl_s must be between {s.lease_ttl_min_s:g} and {s.lease_ttl_max_s:g} "
                f"seconds (got {ttl_s:g}); heartbeat more often instead of asking for more"
            )
        return ttl_s

    def _check_wait(self, wait_s: float | None) -> float:
        s = self.settings
        if wait_s is None:
            return s.lease_wait_default_s
        if not 0 <= wait_s <= s.lease_wait_max_s:
            raise InvalidInput(
                f"wait_s must be between 0 and {s.lease_wait_max_s:g} seconds (got {wait_s:g})"
            )
        return wait_s

    async def acquire(
        self,
        principal: Principal,
        *,
        profile_name: str,
        holder: Mapping[str, Any],
        ttl_s: float | None = None,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[LeaseRecord, bool]:
        """Lease ``profile_name``; returns the lease and whether this call created it."""
        started = self.clock.monotonic()
        outcome = "error"
        try:
            lease, created = await self._acquire(
                principal, profile_name, holder, ttl_s, wait_s, idempotency_key
            )
            outcome = "created" if created else "replayed"
            return lease, created
        except PcleaseError as exc:
            outcome = exc.code
            raise
        finally:
            self.instruments.lease_request(outcome, self.clock.monotonic() - started)

    async def _acquire(
        self,
        principal: Principal,
        profile_name: str,
        holder: Mapping[str, Any],
        ttl_s: float | None,
        wait_s: float | None,
        idempotency_key: str | None,
    ) -> tuple[LeaseRecord, bool]:
        if not principal.can_lease:
            raise Forbidden("this token cannot take leases; create one with --scope lease")
        ask = LeaseAsk(
            principal,
            self._profile(profile_name),
            holder,
            self._check_ttl(ttl_s),
            idempotency_key,
            self.quotas.for_token(principal.name),
        )
        wait = self._check_wait(wait_s)
        if idempotency_key is not None:
            existing = await self.db.read(
                lambda tx: leases.lease_by_idempotency_key(tx, principal.token_id, idempotency_key)
            )
            if existing is not None:
                return replay(ask, existing), False
        # A lease may still join a context that runs; only one that needs a new context is
        # refused (it would wait forever for a context that cannot start).
        cannot_start = await self.ready_check() if self.ready_check is not None else None

        async def attempt(ticket: int | None) -> Grant:
            turn = Turn(ticket, self.replica, self.settings.replica_ttl_s)
            outcome = await self._grant(ask, turn, cannot_start)
            if outcome.cannot_start is not None:
                raise BackendUnavailable(
                    f"{outcome.cannot_start}; fix them and retry the lease request"
                )
            return outcome

        profile = ask.profile

        def full(retry_after_s: int) -> CapacityExhausted:
            return CapacityExhausted(
                f"profile {profile.name!r} is at capacity ({profile.max_contexts} "
                f"context(s) of {profile.max_leases_per_context} leases each); retry "
                f"after {retry_after_s} s or pass a longer wait_s",
                retry_after_s=retry_after_s,
            )

        got = await wait_in_line(
            self.notifier.queues[profile.name],
            self.clock,
            wait,
            attempt,
            full,
            _Tickets(self, profile.name),
            ended=lambda: self.notifier.draining,
        )
        assert got.lease is not None
        return got.lease, got.created

    async def _grant(self, ask: LeaseAsk, turn: Turn, cannot_start: str | None) -> Grant:
        try:
            outcome = await self.db.write(lambda tx: join(tx, ask, turn))
            if outcome is None:
                outcome = await self.db.write(
                    lambda tx: allocate(
                        tx, ask, turn, backend=self.backend_kind, cannot_start=cannot_start
                    )
                )
            return outcome
        except IntegrityError:
            # The same Idempotency-Key raced in concurrently and the other request won.
            key = ask.idempotency_key
            if key is None:
                raise
            existing = await self.db.read(
                lambda tx: leases.lease_by_idempotency_key(tx, ask.principal.token_id, key)
            )
            if existing is None:
                raise
            return Grant(replay(ask, existing), created=False)

    # -- read -----------------------------------------------------------------------------

    def _visible(
        self, principal: Principal, lease: LeaseRecord | None, lease_id: str
    ) -> LeaseRecord:
        if lease is None:
            raise LeaseNotFound(lease_id)
        if not principal.can_read_all and lease.token_id != principal.token_id:
            raise LeaseNotFound(lease_id)
        return lease

    def _owned(self, principal: Principal, lease: LeaseRecord | None, lease_id: str) -> LeaseRecord:
        lease = self._visible(principal, lease, lease_id)
        if not principal.is_admin and lease.token_id != principal.token_id:
            raise Forbidden(
                f"lease {lease_id} belongs to another token; only its owner or an admin "
                "token may change it"
            )
        return lease

    async def get(
        self,
        principal: Principal,
        lease_id: str,
        *,
        wait_s: float = 0.0,
        while_state: LeaseState | None = None,
    ) -> LeaseRecord:
        """The lease; with ``wait_s``, wait until its state differs from ``while_state``
        (default: its state now)."""
        if not 0 <= wait_s <= self.settings.long_poll_max_s:
            raise InvalidInput(
                f"wait_s must be between 0 and {self.settings.long_poll_max_s:g} seconds"
            )
        waiting_while = while_state
        if wait_s == 0 or while_state not in (None, LeaseState.ACTIVE):
            # An answer now (no wait, or the lease already left the state waited out):
            # an active lease this replica trusts needs no database read.
            known = self.active.read(principal, lease_id)
            if known is not None:
                return known

        async def read() -> LeaseRecord:
            nonlocal waiting_while
            found = await self.db.read(lambda tx: leases.get_lease(tx, lease_id))
            lease = self._visible(principal, found, lease_id)
            if waiting_while is None:
                waiting_while = lease.state
            return lease

        lease = await long_poll(
            self.clock,
            wait_s,
            token=lambda: self.notifier.lease_token(lease_id),
            read=read,
            done=lambda lease: lease.state is not waiting_while,
            ended=lambda: self.notifier.draining,
        )
        self.active.remember(lease)
        return lease

    async def list_leases(
        self,
        principal: Principal,
        *,
        context_id: str | None = None,
        states: list[LeaseState] | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        limit: int = 500,
    ) -> list[LeaseRecord]:
        token_id = None if principal.can_read_all else principal.token_id
        return await self.db.read(
            lambda tx: leases.list_leases(
                tx,
                context_id=context_id,
                token_id=token_id,
                states=states,
                dag_id=dag_id,
                run_id=run_id,
                limit=limit,
            )
        )

    # -- change ---------------------------------------------------------------------------

    async def heartbeat(self, principal: Principal, lease_id: str) -> LeaseRecord:
        def unit(tx: Tx) -> LeaseRecord:
            lease = self._owned(principal, leases.get_lease(tx, lease_id), lease_id)
            if lease.state.is_terminal:
                raise LeaseEnded(lease_id, lease.state.value, lease.end_reason)
            extended = leases.heartbeat(tx, lease_id)
            if extended is not None:
                return extended
            # Past its expiry but not yet reaped: expire it now, commit, and say so.
            reason = f"no heartbeat within its ttl of {lease.ttl_s:g} s"
            ended = leases.end_lease(
                tx, lease_id, LeaseState.EXPIRED, actor=principal.actor, reason=reason
            ) or leases.get_lease(tx, lease_id)
            assert ended is not None
            tx.deferred_error = LeaseEnded(lease_id, ended.state.value, ended.end_reason)
            return ended

        return await self.active.heartbeat(principal, lease_id, lambda: self.db.write(unit))

    async def release(self, principal: Principal, lease_id: str) -> LeaseRecord:
        """End the lease; idempotent (an ended lease is returned as it is)."""

        def unit(tx: Tx) -> LeaseRecord:
            self._owned(principal, leases.get_lease(tx, lease_id), lease_id)
            leases.end_lease(
                tx,
                lease_id,
                LeaseState.RELEASED,
                actor=principal.actor,
                reason=f"released by {principal.actor}",
            )
            lease = leases.get_lease(tx, lease_id)
            assert lease is not None
            return lease

        return await self.db.write(unit)

    async def revoke(self, principal: Principal, lease_id: str) -> LeaseRecord | None:
        """Admin: end someone's lease now (its task fails its next heartbeat). None when
        the lease was not live any more."""
        if not principal.is_admin:
            raise Forbidden("revoking a lease needs a token with the admin scope")
        actor = principal.actor
        return await self.db.write(
            lambda tx: leases.end_lease(
                tx, lease_id, LeaseState.REVOKED, actor=actor, reason=f"revoked by {actor}"
            )
        )

    async def release_holder(
        self,
        principal: Principal,
        *,
        dag_id: str,
        run_id: str,
        task_id: str | None,
        map_index: int | None = None,
    ) -> list[LeaseRecord]:
        """Release every live lease of one holder (its own unless the caller is admin)."""
        if not principal.can_lease:
            raise Forbidden("this token cannot release leases; it needs the lease scope")

        def unit(tx: Tx) -> list[LeaseRecord]:
            token_id = None if principal.is_admin else principal.token_id
            live = leases.list_leases(
                tx,
                token_id=token_id,
                states=LIVE_LEASE_STATES,
                dag_id=dag_id,
                run_id=run_id,
                task_id=task_id,
            )
            if map_index is not None:
                # A mapped task's instances share a task_id; only one of them is meant.
                live = [lease for lease in live if lease.holder.get("map_index") == map_index]
            released = []
            for lease in live:
                ended = leases.end_lease(
                    tx,
                    lease.id,
                    LeaseState.RELEASED,
                    actor=principal.actor,
                    reason=f"holder {dag_id}/{run_id}"
                    + (f"/{task_id}" if task_id else "")
                    + f" released by {principal.actor}",
                )
                if ended is not None:
                    released.append(ended)
            return released

        return await self.db.write(unit)
