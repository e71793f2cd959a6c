"""What callers can do with leases: acquire, watch, heartbeat, release.

This is the layer the HTTP routes call. It checks input and ownership, runs each step as
one transaction through :class:`~service.db.session.Database`, and waits (FIFO per
profile) when a profile is at capacity. It never talks to a backend: a new context is
only a ``starting`` row here, and the reconciler starts it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import IntegrityError

from pclease_service import metrics, store
from pclease_service.config import Profile, Settings
from pclease_service.db.session import Database
from pclease_service.errors import (
    BackendUnavailable,
    CapacityExhausted,
    Forbidden,
    IdempotencyConflict,
    InvalidInput,
    LeaseEnded,
    LeaseNotFound,
    UnknownProfile,
)
from pclease_service.notify import Notifier, wait_token
from pclease_service.states import LIVE_LEASE_STATES, LeaseState
from pclease_service.store import LeaseRecord, Tx

# Waiters re-check the database this often even without a wake-up, so capacity freed by
# another service replica is seen too.
_RECHECK_S = 1.0


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: one API token."""

    token_id: str
    name: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def can_read_all(self) -> bool:
        return self.is_admin or "read" in self.scopes

    @property
    def can_lease(self) -> bool:
        return self.is_admin or "lease" in self.scopes

    @property
    def actor(self) -> str:
        return f"token:{self.name}"


@dataclass(frozen=True)
class _Acquired:
    lease: LeaseRecord | None
    created: bool
    retry_after_s: int = 1
    #: Why no new context could be started, when one was needed.
    cannot_start: str | None = None


class LeaseManager:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        notifier: Notifier,
        backend_kind: str,
        *,
        ready_check: Callable[[], Awaitable[str | None]] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.notifier = notifier
        self.backend_kind = backend_kind
        # Says why the backend cannot start contexts now (bad credentials), or None.
        self.ready_check = ready_check

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

    @metrics.timed_lease_request
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
        if not principal.can_lease:
            raise Forbidden("this token cannot take leases; create one with --scope lease")
        profile = self._profile(profile_name)
        ttl = self._check_ttl(ttl_s)
        wait = self._check_wait(wait_s)
        fp = store.fingerprint({"profile": profile.name, "holder": dict(holder), "ttl_s": ttl})
        if idempotency_key is not None:
            existing = await self.db.read(
                lambda tx: store.lease_by_idempotency_key(tx, principal.token_id, idempotency_key)
            )
            if existing is not None:
                return self._replay(existing, fp), False
        # A lease may still join a context that runs; only one that needs a new context is
        # refused (it would wait forever for a context that cannot start).
        cannot_start = await self.ready_check() if self.ready_check is not None else None

        async def attempt() -> _Acquired:
            outcome = await self._try_acquire(
                principal, profile, holder, ttl, fp, idempotency_key, cannot_start
            )
            if outcome.cannot_start is not None:
                raise BackendUnavailable(
                    f"{outcome.cannot_start}; fix them and retry the lease request"
                )
            return outcome

        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        queue = self.notifier.queues[profile.name]
        retry_after = 1
        if not queue.tickets:
            # Nobody is waiting: try at once. The queue only orders requests that have
            # already found the profile full, so it never slows down the common case.
            outcome = await attempt()
            if outcome.lease is not None:
                return outcome.lease, outcome.created
            retry_after = outcome.retry_after_s
        ticket = queue.enter()
        try:
            while True:
                token = queue.pulse.token()
                remaining = deadline - loop.time()
                if queue.is_head(ticket) and remaining > 0:
                    outcome = await attempt()
                    if outcome.lease is not None:
                        return outcome.lease, outcome.created
                    retry_after = outcome.retry_after_s
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise CapacityExhausted(
                        f"profile {profile.name!r} is at capacity ({profile.max_contexts} "
                        f"context(s) of {profile.max_leases_per_context} leases each); retry "
                        f"after {retry_after} s or pass a longer wait_s",
                        retry_after_s=retry_after,
                    )
                await wait_token(token, min(remaining, _RECHECK_S))
        finally:
            queue.leave(ticket)

    def _replay(self, lease: LeaseRecord, fp: str) -> LeaseRecord:
        if lease.request_fingerprint != fp:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used for a different lease request; "
                "use a new key for a new request"
            )
        return lease

    async def _try_acquire(
        self,
        principal: Principal,
        profile: Profile,
        holder: Mapping[str, Any],
        ttl: float,
        fp: str,
        idempotency_key: str | None,
        cannot_start: str | None = None,
    ) -> _Acquired:
        who = _describe_holder(holder, principal)
        reason = f"lease requested by {who}"

        def replayed(tx: Tx) -> _Acquired | None:
            if idempotency_key is None:
                return None
            existing = store.lease_by_idempotency_key(tx, principal.token_id, idempotency_key)
            if existing is None:
                return None
            return _Acquired(self._replay(existing, fp), created=False)

        def lease_on(tx: Tx, context: store.ContextRecord) -> _Acquired:
            lease = store.insert_lease(
                tx,
                context=context,
                token_id=principal.token_id,
                ttl_s=ttl,
                holder=holder,
                idempotency_key=idempotency_key,
                request_fingerprint=fp,
                actor=principal.actor,
            )
            return _Acquired(lease, created=True)

        def join(tx: Tx) -> _Acquired | None:
            # A context with room that nobody is changing right now: no profile lock, and
            # no waiting, so warm profiles never queue here.
            if (outcome := replayed(tx)) is not None:
                return outcome
            context = store.join_context(
                tx, profile, actor=principal.actor, reason=reason, wait=False
            )
            return None if context is None else lease_on(tx, context)

        def allocate(tx: Tx) -> _Acquired:
            # A transaction of its own, so it holds no context row when it asks for the
            # profile lock (the lock order of store.lock_profile).
            if (outcome := replayed(tx)) is not None:
                return outcome
            store.lock_profile(tx, profile.name)
            context = store.join_context(tx, profile, actor=principal.actor, reason=reason)
            if context is None:
                if store.count_live_contexts(tx, profile.name) >= profile.max_contexts:
                    earliest = store.earliest_expiry(tx, profile.name)
                    retry = 1
                    if earliest is not None:
                        retry = max(1, min(60, math.ceil((earliest - tx.now).total_seconds())))
                    return _Acquired(None, created=False, retry_after_s=retry)
                if cannot_start is not None:
                    return _Acquired(None, created=False, cannot_start=cannot_start)
                context = store.create_context(
                    tx,
                    profile,
                    self.backend_kind,
                    actor=principal.actor,
                    reason=f"no context of {profile.name!r} had room for {who}",
                )
            return lease_on(tx, context)

        try:
            outcome = await self.db.write(join)
            if outcome is None:
                outcome = await self.db.write(allocate)
        except IntegrityError:
            # The same Idempotency-Key raced in concurrently and the other request won.
            if idempotency_key is None:
                raise
            existing = await self.db.read(
                lambda tx: store.lease_by_idempotency_key(tx, principal.token_id, idempotency_key)
            )
            if existing is None:
                raise
            return _Acquired(self._replay(existing, fp), created=False)
        return outcome

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
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            token = self.notifier.lease_token(lease_id)
            lease = self._visible(
                principal, await self.db.read(lambda tx: store.get_lease(tx, lease_id)), lease_id
            )
            if while_state is None:
                while_state = lease.state
            remaining = deadline - loop.time()
            if lease.state != while_state or remaining <= 0:
                return lease
            await wait_token(token, min(remaining, _RECHECK_S))

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
            lambda tx: store.list_leases(
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
            lease = self._owned(principal, store.get_lease(tx, lease_id), lease_id)
            if lease.state.is_terminal:
                raise LeaseEnded(lease_id, lease.state.value, lease.end_reason)
            extended = store.heartbeat(tx, lease_id)
            if extended is not None:
                return extended
            # Past its expiry but not yet reaped: expire it now, commit, and say so.
            reason = f"no heartbeat within its ttl of {lease.ttl_s:g} s"
            ended = store.end_lease(
                tx, lease_id, LeaseState.EXPIRED, actor=principal.actor, reason=reason
            ) or store.get_lease(tx, lease_id)
            assert ended is not None
            tx.deferred_error = LeaseEnded(lease_id, ended.state.value, ended.end_reason)
            return ended

        return await self.db.write(unit)

    async def release(self, principal: Principal, lease_id: str) -> LeaseRecord:
        """End the lease; idempotent (an ended lease is returned as it is)."""

        def unit(tx: Tx) -> LeaseRecord:
            self._owned(principal, store.get_lease(tx, lease_id), lease_id)
            store.end_lease(
                tx,
                lease_id,
                LeaseState.RELEASED,
                actor=principal.actor,
                reason=f"released by {principal.actor}",
            )
            lease = store.get_lease(tx, lease_id)
            assert lease is not None
            return lease

        return await self.db.write(unit)

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
            live = store.list_leases(
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
                ended = store.end_lease(
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


def _describe_holder(holder: Mapping[str, Any], principal: Principal) -> str:
    parts = [str(holder[k]) for k in ("dag_id", "run_id", "task_id") if holder.get(k)]
    return "/".join(parts) + f" ({principal.actor})" if parts else principal.actor


async def force_stop_context(
    db: Database, notifier: Notifier, principal: Principal, context_id: str
) -> store.ContextRecord:
    """Admin: revoke every lease of a context and stop it now."""
    from pclease_service.errors import ContextNotFound, IllegalTransition

    def unit(tx: Tx) -> store.ContextRecord:
        context = store.get_context(tx, context_id)
        if context is None:
            raise ContextNotFound(context_id)
        if context.state.is_terminal or context.state.value == "stopping":
            if context.state.value == "stopping":
                return context
            raise IllegalTransition(
                f"context {context_id} is already {context.state.value}; nothing to stop"
            )
        stopped = store.force_stop(
            tx, context_id, actor=principal.actor, reason=f"force-stopped by {principal.actor}"
        )
        return stopped or context

    return await db.write(unit)
