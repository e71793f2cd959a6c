"""A token's usage, folded from the rows :mod:`pclease_service.store.usage` reads.

Instance-hours and cost are counted the way the ledger counts them: a context is up (and
costs its ``hourly_cost``) from its creation until it stopped or failed. Days and months
are UTC.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pclease_service.db.tx import Tx
from pclease_service.states import LIVE_CONTEXT_STATES
from pclease_service.store import tokens, usage
from pclease_service.store.usage import StartedContext


def day_start(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def next_day(now: datetime) -> datetime:
    return day_start(now) + timedelta(days=1)


def month_start(now: datetime) -> datetime:
    return day_start(now).replace(day=1)


def next_month(now: datetime) -> datetime:
    start = month_start(now)
    return (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )


def up_seconds(context: StartedContext, since: datetime, now: datetime) -> float:
    """Seconds ``context`` was up between ``since`` and ``now``."""
    end = context.stopped_at
    if end is None:
        end = now if context.state in LIVE_CONTEXT_STATES else context.created_at
    return max(0.0, (min(end, now) - max(context.created_at, since)).total_seconds())


@dataclass
class TokenUsage:
    """What one token holds now and has spent in the current day and month."""

    live_leases: int = 0
    #: Live contexts it started, by profile.
    live_contexts: dict[str, int] = field(default_factory=dict)
    instance_hours_today: float = 0.0
    #: Cost of the contexts it started, by profile, this month.
    cost_this_month: dict[str, float] = field(default_factory=dict)


def fold(started: Iterable[StartedContext], live_leases: int, now: datetime) -> TokenUsage:
    """One token's usage from the contexts it started (live or stopped this month)."""
    today, month = day_start(now), month_start(now)
    live: dict[str, int] = defaultdict(int)
    cost: dict[str, float] = defaultdict(float)
    hours = 0.0
    for context in started:
        if context.state in LIVE_CONTEXT_STATES:
            live[context.profile] += 1
        hours += up_seconds(context, today, now) / 3600
        cost[context.profile] += up_seconds(context, month, now) / 3600 * context.hourly_cost
    return TokenUsage(live_leases, dict(live), hours, dict(cost))


def usage_by_token(
    started: Iterable[StartedContext], live_leases: dict[str, int], now: datetime
) -> dict[str, TokenUsage]:
    """Usage of every token that holds a lease or started a context this month, by id."""
    by_token: dict[str, list[StartedContext]] = defaultdict(list)
    for context in started:
        by_token[context.token_id].append(context)
    return {
        token_id: fold(by_token.get(token_id, []), live_leases.get(token_id, 0), now)
        for token_id in sorted(set(by_token) | set(live_leases))
    }


def usage_by_name(tx: Tx) -> dict[str, TokenUsage]:
    """Every token's usage by token name (what ``/metrics`` and the dashboard show: names
    are chosen by operators and few, never secrets; ids never leave the service)."""
    now = tx.now
    by_id = usage_by_token(
        usage.started_since(tx, month_start(now)), usage.live_leases_by_token(tx), now
    )
    names = tokens.token_names(tx, by_id)
    return {names.get(token_id, token_id): used for token_id, used in by_id.items()}
