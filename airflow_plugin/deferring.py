"""What the deferrable operators share: whether to defer by default, how a task leases for
deferring, and how it reads the trigger's event when it resumes.

A deferrable task holds its lease in three places in turn: the task process (which creates
it, submits the query, and finishes), the triggerer (:mod:`airflow_plugin.triggers`, while
the context boots and while the query runs), and the task process again. What passes
between them is a :class:`~pclease_client.LeaseRef`, never the token.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from airflow_plugin.hooks import PcleaseHook, PcleaseLeaseLostError, holder_labels, task_holder
from airflow_plugin.links import persist_lease_link
from pclease_client import LeaseInfo, LeaseLost, LeaseRef, LeaseState, PcleaseClient

#: The TTL of a deferrable task's lease unless the task sets one: the lease passes from the
#: task to the triggerer and back, and each handover waits for Airflow to schedule it (tens
#: of seconds on a busy deployment; a triggerer that dies is replaced after its health
#: check threshold, 30 s by default).
DEFERRED_TTL_S = 300.0
#: A context that runs, or a query that ends, within this long is waited for in the task;
#: a longer wait is deferred (handing it to the triggerer and back costs seconds of
#: scheduling).
SHORT_WAIT_S = 2.0
#: The trigger fires no earlier than this long after the task deferred. Airflow 3.3's
#: scheduler fails a task that was resumed (and runs again) before it processed the end of
#: the process that deferred it, which takes seconds on a busy machine (the LocalExecutor
#: reports both under one key): a trigger that fired at once would lose the task.
SETTLE_S = 10.0


def default_deferrable() -> bool:
    """``[pclease] default_deferrable``, else ``[operators] default_deferrable`` (Airflow's
    own switch for every provider's operators), else False."""
    from airflow.providers.common.compat.sdk import conf

    fallback = conf.getboolean("operators", "default_deferrable", fallback=False)
    return bool(conf.getboolean("pclease", "default_deferrable", fallback=fallback))


def lease_for_deferral(
    hook: PcleaseHook,
    context: Mapping[str, Any],
    profile: str,
    *,
    ttl_s: float | None,
    holder: Mapping[str, Any] | None = None,
) -> tuple[LeaseInfo, LeaseRef]:
    """Lease ``profile`` for the running task (no watchdog: the task process is meant to
    end while the lease lives on in the triggerer); store its dashboard link. Without a
    ``ttl_s``, the lease gets :data:`DEFERRED_TTL_S`."""
    who = {**task_holder(context), **dict(holder or {})}
    client: PcleaseClient = hook.get_conn()
    info = client.create_lease(
        profile, holder=who, ttl_s=DEFERRED_TTL_S if ttl_s is None else ttl_s
    )
    hook.log.info(
        "leased pclease profile %r: lease %s on context %s (%s); dashboard: %s",
        profile,
        info.id,
        info.context_id,
        info.state.value,
        hook.lease_url(info.id),
    )
    persist_lease_link(context, info.id, hook.lease_url(info.id))
    return info, LeaseRef(info.id, holder_labels(who), polars_errors=True)


def deadline(start_timeout_s: float) -> float:
    """When a context must run by, on the wall clock (the trigger may run elsewhere)."""
    return time.time() + start_timeout_s


def settled() -> float:
    """When a trigger deferred to now may fire (see :data:`SETTLE_S`), on the wall clock."""
    return time.time() + SETTLE_S


def wait_briefly(hook: PcleaseHook, info: LeaseInfo) -> LeaseInfo:
    """The lease once its context runs, or after :data:`SHORT_WAIT_S` (a warm or quick
    context is not worth deferring for)."""
    if info.state is not LeaseState.PENDING:
        return info
    return hook.get_conn().get_lease(info.id, wait_s=SHORT_WAIT_S, while_state=LeaseState.PENDING)


def lease_from_event(event: Mapping[str, Any] | None, start_timeout_s: float) -> LeaseRef:
    """The lease the trigger hands back, or the task's failure: the lease ended underneath
    it, or its context did not run in time (the trigger released the lease then)."""
    status = (event or {}).get("status")
    if event is None or status not in ("running", "done", "lost", "timeout"):
        raise RuntimeError(
            f"the pclease trigger sent an event this provider does not know: {event}"
        )
    if status == "lost":
        state = LeaseState(event["state"]) if event.get("state") else None
        lost = LeaseLost(str(event["lease_id"]), state, event.get("reason"))
        raise PcleaseLeaseLostError.from_lost(lost)
    if status == "timeout":
        lost = LeaseLost(
            str(event["lease_id"]),
            LeaseState.PENDING,
            f"context not running after {start_timeout_s:g} s",
        )
        raise PcleaseLeaseLostError.from_lost(lost)
    return LeaseRef.from_json(event["lease"])


def release_quietly(hook: PcleaseHook, lease_id: str) -> None:
    """Release the lease; a failure is logged (the listener and the TTL end it anyway)."""
    try:
        lease = hook.get_conn().release(lease_id)
        hook.log.info("released pclease lease %s (%s)", lease.id, lease.state.value)
    except Exception as exc:
        hook.log.warning("could not release pclease lease %s (its TTL ends it): %s", lease_id, exc)
