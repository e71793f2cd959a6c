"""A token's usage: up time counted inside the UTC day and month, as the ledger counts it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pclease_service.quotas.usage import fold, next_day, next_month, usage_by_token
from pclease_service.states import ContextState
from pclease_service.store.usage import StartedContext

NOW = datetime(2026, 12, 31, 1, 0, tzinfo=UTC)


def started(
    profile: str,
    state: ContextState,
    created: datetime,
    stopped: datetime | None = None,
    owner: str = "t1",
    cost: float = 2.0,
) -> StartedContext:
    return StartedContext(owner, f"c-{created:%d%H%M}", profile, state, created, stopped, cost)


def test_windows_restart_at_utc_midnight_and_on_the_first() -> None:
    assert next_day(NOW) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month(NOW) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_month(datetime(2026, 2, 14, 23, tzinfo=UTC)) == datetime(2026, 3, 1, tzinfo=UTC)


def test_fold_counts_live_contexts_and_only_the_window_s_part() -> None:
    contexts = [
        # Up since yesterday 23:00: 1 h today, 2 h this month.
        started("large", ContextState.RUNNING, NOW - timedelta(hours=2)),
        # Stopped today after 30 min: 0.5 h today.
        started(
            "small",
            ContextState.STOPPED,
            NOW - timedelta(minutes=50),
            NOW - timedelta(minutes=20),
            cost=1.0,
        ),
        # Failed last month, ran into this one for an hour.
        started(
            "large",
            ContextState.FAILED,
            datetime(2026, 11, 30, 23, tzinfo=UTC),
            datetime(2026, 12, 1, 1, tzinfo=UTC),
        ),
    ]
    usage = fold(contexts, 3, NOW)
    assert usage.live_leases == 3
    assert usage.live_contexts == {"large": 1}
    assert usage.instance_hours_today == 1.5
    assert usage.cost_this_month == {"large": (2 + 1) * 2.0, "small": 0.5}


def test_usage_by_token_includes_tokens_that_only_hold_leases() -> None:
    contexts = [started("small", ContextState.IDLE, NOW - timedelta(hours=1), owner="t1")]
    usage = usage_by_token(contexts, {"t2": 4}, NOW)
    assert sorted(usage) == ["t1", "t2"]
    assert usage["t1"].live_contexts == {"small": 1} and usage["t1"].live_leases == 0
    assert usage["t2"].live_leases == 4 and usage["t2"].cost_this_month == {}
