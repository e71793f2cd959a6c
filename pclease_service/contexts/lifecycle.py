"""Context transitions that reach its leases, each inside the caller's transaction.

A context that starts activates the leases waiting for it; one that fails fails them; one
that is stopped by force revokes them. (A lease that ends gives its slot back by itself:
:func:`pclease_service.store.leases.end_lease`.)
"""

from __future__ import annotations

from pclease_service.db.tx import Tx
from pclease_service.states import LeaseState, StopKind
from pclease_service.store import contexts, leases
from pclease_service.store.contexts import ContextRecord


def started(tx: Tx, context_id: str, *, actor: str) -> ContextRecord | None:
    """starting → running (or idle, if every lease left while it booted); its pending
    leases become active."""
    row = contexts.mark_started(tx, context_id, actor=actor)
    if row is not None:
        leases.activate_pending(tx, context_id, actor=actor)
    return row


def failed(tx: Tx, context_id: str, message: str, *, actor: str) -> ContextRecord | None:
    """Any live state → failed; its leases fail with the same reason."""
    row = contexts.fail_context(tx, context_id, message, actor=actor)
    if row is not None:
        leases.end_live_leases(
            tx, context_id, LeaseState.FAILED, actor=actor, reason=f"context failed: {message}"
        )
    return row


def force_stopped(
    tx: Tx, context_id: str, *, kind: StopKind, actor: str, reason: str
) -> ContextRecord | None:
    """Any live state → stopping now; its leases are revoked (admin, shutdown)."""
    row = contexts.force_stop(tx, context_id, kind=kind, actor=actor, reason=reason)
    if row is not None:
        leases.end_live_leases(tx, context_id, LeaseState.REVOKED, actor=actor, reason=reason)
    return row
