"""The one rule that admits a lease request under its token's quota.

Called by :mod:`pclease_service.leases.grant` inside the grant's transaction:
:func:`admit_lease` first in each of its transactions (it takes the token's row lock when a
limit applies, before the profile lock and any context row), :func:`admit_start` when that
transaction would create a context, and :func:`record_start` once it has. Each refusal
raises, so the transaction rolls back and nothing the token holds changes.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime

from pclease_service.config import Profile, Quota
from pclease_service.db.tx import Tx
from pclease_service.errors import BudgetExhausted, QuotaExceeded, QuotaName, QuotaUse
from pclease_service.principals import Principal
from pclease_service.quotas.usage import fold, month_start, next_day, next_month
from pclease_service.store import usage

log = logging.getLogger("pclease.quotas")

#: Retry-After when nothing says sooner: a lease's end is what frees a slot, and leases
#: heartbeat, so a guess beyond a minute is no better than asking again.
_RETRY_MAX_S = 60


def _retry_after(at: datetime | None, now: datetime, default: int = 30) -> int:
    if at is None:
        return default
    return max(1, min(_RETRY_MAX_S, math.ceil((at - now).total_seconds())))


def _limits_start(quota: Quota, profile: Profile) -> bool:
    limits = quota.profiles.get(profile.name)
    return quota.max_instance_hours_per_day is not None or (
        limits is not None
        and (limits.max_live_contexts is not None or limits.monthly_budget is not None)
    )


def admit_lease(
    tx: Tx, principal: Principal, quota: Quota, *, may_start: Profile | None = None
) -> None:
    """Refuse a lease the token may not take (``max_live_leases``). With ``may_start``,
    the transaction may go on to create a context of that profile: the token's lock is
    taken now too if :func:`admit_start` will need it, so it is always taken first."""
    limit = quota.max_live_leases
    if limit is None and (may_start is None or not _limits_start(quota, may_start)):
        return
    usage.lock_token(tx, principal.token_id)
    if limit is None:
        return
    used = usage.live_lease_count(tx, principal.token_id)
    if used < limit:
        return
    retry = _retry_after(usage.earliest_lease_expiry(tx, principal.token_id), tx.now)
    raise QuotaExceeded(
        f"token {principal.name!r} holds {used} live lease(s) and its quota "
        f"max_live_leases is {limit}; release one of them (or let one end) and retry after "
        f"{retry} s. Nothing it holds was changed",
        QuotaUse(QuotaName.LIVE_LEASES, used, limit),
        retry,
    )


def admit_start(tx: Tx, principal: Principal, quota: Quota, profile: Profile) -> None:
    """Refuse a request that would create a context of ``profile`` when the token may not
    start one (live contexts, instance-hours today, a hard monthly budget). Only called
    after :func:`admit_lease` with ``may_start=profile`` in the same transaction."""
    if not _limits_start(quota, profile):
        return
    now = tx.now
    started = usage.started_since(tx, month_start(now), principal.token_id)
    used = fold(started, 0, now)
    limits = quota.profiles.get(profile.name)
    name = principal.name
    if limits is not None and limits.max_live_contexts is not None:
        live = used.live_contexts.get(profile.name, 0)
        if live >= limits.max_live_contexts:
            retry = _retry_after(
                usage.earliest_expiry_on_started(tx, principal.token_id, profile.name), now
            )
            raise QuotaExceeded(
                f"token {name!r} started {live} live context(s) of profile {profile.name!r} "
                f"and its quota max_live_contexts for it is {limits.max_live_contexts}; none "
                f"of them has room for another lease. Retry after {retry} s (a lease on them "
                "may have ended by then), or pass a wait_s. Nothing it holds was changed",
                QuotaUse(QuotaName.LIVE_CONTEXTS, live, limits.max_live_contexts, profile.name),
                retry,
            )
    hours_limit = quota.max_instance_hours_per_day
    if hours_limit is not None and used.instance_hours_today >= hours_limit:
        frees = next_day(now)
        raise QuotaExceeded(
            f"the contexts token {name!r} started were up {used.instance_hours_today:.2f} "
            f"instance-hours today (UTC) and its quota max_instance_hours_per_day is "
            f"{hours_limit:g}; it can start contexts again at {frees.isoformat()}. Leases "
            "that join a running context still work, and nothing it holds was changed",
            QuotaUse(
                QuotaName.INSTANCE_HOURS_PER_DAY,
                used.instance_hours_today,
                hours_limit,
                frees_at=frees,
            ),
            max(1, math.ceil((frees - now).total_seconds())),
        )
    if limits is not None and limits.monthly_budget is not None:
        spent = used.cost_this_month.get(profile.name, 0.0)
        if spent >= limits.monthly_budget:
            frees = next_month(now)
            use = QuotaUse(
                QuotaName.MONTHLY_BUDGET,
                spent,
                limits.monthly_budget,
                profile.name,
                frees_at=frees,
            )
            if limits.monthly_budget_hard:
                raise BudgetExhausted(
                    f"token {name!r} spent {spent:.2f} of its monthly budget of "
                    f"{limits.monthly_budget:g} on profile {profile.name!r}; it can start "
                    f"contexts of it again on {frees.date().isoformat()} (UTC). Leases that "
                    "join a running context still work, and nothing it holds was changed; "
                    "an operator can raise the budget in the configuration",
                    use,
                )
            log.warning(
                "token %r is over its monthly budget on profile %r (%.2f of %g; soft: "
                "starting a context anyway)",
                name,
                profile.name,
                spent,
                limits.monthly_budget,
            )


def record_start(tx: Tx, principal: Principal, context_id: str) -> None:
    """The token whose request created ``context_id``: the contexts its quotas count."""
    usage.record_starter(tx, context_id, principal.token_id)
