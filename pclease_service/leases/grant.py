"""How a lease is granted: a slot on a context that has room, or a new context.

At most two transactions, each of which replays a lease its ``Idempotency-Key`` made
before (a different request under the same key is refused):

1. :func:`join`: a context of the profile that has room and that no other transaction
   holds right now (:func:`store.contexts.join_context` with ``wait=False``: a guarded
   UPDATE checks room and state, so warm profiles never queue on a lock). Contexts past
   the profile's ``max_lifetime_s`` take no new lease
   (:func:`contexts.rules.joinable_created_after`).
2. Only when that found none, :func:`allocate`: take the profile's lock (first, holding no
   context row), look again, and if the profile may have another context (and the backend
   can start one) create it ``starting``; the reconciler starts it. A full profile answers
   when a slot may free up.

Either inserts the lease: ``active`` on a running or idle context, ``pending`` on a
starting one. Both first ask the token's quota (:mod:`pclease_service.quotas`: every lease
counts, and only a request that would create a context is checked against the limits on
starting one); a refusal raises and changes nothing. Then both check the request's
:class:`Turn`: while lease requests wait for
the profile's capacity (on any replica), only the oldest of them may take it
(:func:`store.waiting.may_take`), in the same transaction.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pclease_service import quotas
from pclease_service.config import Profile, Quota
from pclease_service.contexts.rules import joinable_created_after
from pclease_service.db.tx import Tx
from pclease_service.errors import IdempotencyConflict
from pclease_service.principals import Principal
from pclease_service.store import contexts, leases, profiles, waiting
from pclease_service.store.leases import LeaseRecord


@dataclass(frozen=True)
class Turn:
    """Where a request stands in its profile's line: its waiting ticket (None until it
    had to wait), and what tells a live ticket from one of a replica that is gone."""

    ticket: int | None
    replica: str
    ttl_s: float

    def mine(self, tx: Tx, profile: str) -> bool:
        return waiting.may_take(tx, profile, self.ticket, replica=self.replica, ttl_s=self.ttl_s)


@dataclass(frozen=True)
class LeaseAsk:
    """One validated lease request."""

    principal: Principal
    profile: Profile
    holder: Mapping[str, Any]
    ttl_s: float
    idempotency_key: str | None
    #: The token's quota in force when the request came in.
    quota: Quota = field(default_factory=Quota)

    @property
    def fingerprint(self) -> str:
        """What an idempotent replay must match."""
        payload = {"profile": self.profile.name, "holder": dict(self.holder), "ttl_s": self.ttl_s}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def describe_holder(self) -> str:
        parts = [str(self.holder[k]) for k in ("dag_id", "run_id", "task_id") if self.holder.get(k)]
        actor = self.principal.actor
        return "/".join(parts) + f" ({actor})" if parts else actor


@dataclass(frozen=True)
class Grant:
    """What one attempt got: a lease, or when to retry, or why no context can start."""

    lease: LeaseRecord | None
    created: bool
    retry_after_s: int = 1
    cannot_start: str | None = None


def replay(ask: LeaseAsk, lease: LeaseRecord) -> LeaseRecord:
    """The lease an ``Idempotency-Key`` made first, if this is the same request."""
    if lease.request_fingerprint != ask.fingerprint:
        raise IdempotencyConflict(
            "this Idempotency-Key was already used for a different lease request; "
            "use a new key for a new request"
        )
    return lease


def _replayed(tx: Tx, ask: LeaseAsk) -> Grant | None:
    if ask.idempotency_key is None:
        return None
    existing = leases.lease_by_idempotency_key(tx, ask.principal.token_id, ask.idempotency_key)
    return None if existing is None else Grant(replay(ask, existing), created=False)


def _join(tx: Tx, ask: LeaseAsk, *, wait: bool) -> contexts.ContextRecord | None:
    return contexts.join_context(
        tx,
        ask.profile.name,
        max_leases=ask.profile.max_leases_per_context,
        created_after=joinable_created_after(ask.profile, tx.now),
        actor=ask.principal.actor,
        reason=f"lease requested by {ask.describe_holder()}",
        wait=wait,
    )


def _lease_on(tx: Tx, ask: LeaseAsk, context: contexts.ContextRecord) -> Grant:
    lease = leases.insert_lease(
        tx,
        context=context,
        token_id=ask.principal.token_id,
        ttl_s=ask.ttl_s,
        holder=ask.holder,
        idempotency_key=ask.idempotency_key,
        request_fingerprint=ask.fingerprint,
        actor=ask.principal.actor,
    )
    return Grant(lease, created=True)


#: What :func:`join` answers when older requests wait: not this one's turn.
NOT_YOUR_TURN = Grant(None, created=False, retry_after_s=1)


def join(tx: Tx, ask: LeaseAsk, turn: Turn) -> Grant | None:
    """The first transaction: a slot on a context with room that nobody is changing right
    now (no profile lock, no waiting, so warm profiles never queue here); None if there is
    none, :data:`NOT_YOUR_TURN` if older requests wait."""
    if (replayed := _replayed(tx, ask)) is not None:
        return replayed
    quotas.admit_lease(tx, ask.principal, ask.quota)
    if not turn.mine(tx, ask.profile.name):
        return NOT_YOUR_TURN
    context = _join(tx, ask, wait=False)
    return None if context is None else _lease_on(tx, ask, context)


def allocate(tx: Tx, ask: LeaseAsk, turn: Turn, *, backend: str, cannot_start: str | None) -> Grant:
    """The second transaction, when :func:`join` found nothing: under the profile's lock
    (taken first, holding no context row: the lock order of
    :func:`~pclease_service.store.profiles.lock_profile`), join or create a context.
    ``cannot_start`` says why the backend cannot start a context now, or None."""
    if (replayed := _replayed(tx, ask)) is not None:
        return replayed
    profile = ask.profile
    quotas.admit_lease(tx, ask.principal, ask.quota, may_start=profile)
    profiles.lock_profile(tx, profile.name)
    if not turn.mine(tx, profile.name):
        return NOT_YOUR_TURN
    context = _join(tx, ask, wait=True)
    if context is None:
        quotas.admit_start(tx, ask.principal, ask.quota, profile)
        if contexts.count_live_contexts(tx, profile.name) >= profile.max_contexts:
            earliest = leases.earliest_expiry(tx, profile.name)
            retry = 1
            if earliest is not None:
                retry = max(1, min(60, math.ceil((earliest - tx.now).total_seconds())))
            return Grant(None, created=False, retry_after_s=retry)
        if cannot_start is not None:
            return Grant(None, created=False, cannot_start=cannot_start)
        context = contexts.create_context(
            tx,
            profile,
            backend,
            actor=ask.principal.actor,
            reason=f"no context of {profile.name!r} had room for {ask.describe_holder()}",
        )
        quotas.record_start(tx, ask.principal, context.id)
    return _lease_on(tx, ask, context)
