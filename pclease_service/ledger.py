"""Instance-seconds and cost per profile and state, folded from the event log.

``/metrics`` exports the totals and the dashboard draws the intervals; each app keeps one
:class:`InstanceLedger` that reads the whole history once and then only new events, so the
numbers survive restarts and agree across replicas.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from pclease_service.db.tx import Tx
from pclease_service.states import ContextState
from pclease_service.store import reads

#: Context states during which an instance exists (and costs money).
UP_STATES = (ContextState.STARTING, ContextState.RUNNING, ContextState.IDLE, ContextState.STOPPING)


@dataclass
class _Open:
    profile: str
    state: ContextState
    since: datetime
    hourly_cost: float


@dataclass(frozen=True)
class Interval:
    """One stretch of one context in one state (``end`` None: still in it)."""

    context_id: str
    profile: str
    state: ContextState
    start: datetime
    end: datetime | None
    hourly_cost: float


class InstanceLedger:
    """Seconds (and cost) per profile and state, folded from context transitions.

    Events are read in id order from a cursor. On PostgreSQL a transaction that took an
    id earlier can commit later, so ids skipped over are remembered for a while and asked
    for again (``_gaps``); a skipped id that never shows up was rolled back. Two
    transitions of one context are serialised by its row lock, so per context the events
    always arrive in order.

    It also keeps the intervals of the last ``keep`` (default 24 h) for the dashboard's
    chart. Thread-safe: ``catch_up`` runs in the database worker threads.
    """

    def __init__(self, keep: timedelta = timedelta(hours=24), gap_wait_s: float = 120.0) -> None:
        self.keep = keep
        self.gap_wait_s = gap_wait_s
        self.cursor = 0
        self._gaps: dict[int, float] = {}
        self._open: dict[str, _Open] = {}
        self._seconds: dict[tuple[str, str], float] = defaultdict(float)
        self._cost: dict[str, float] = defaultdict(float)
        self._intervals: list[Interval] = []
        self._lock = threading.Lock()

    def catch_up(self, tx: Tx, *, batch: int = 5000) -> None:
        with self._lock:
            while True:
                rows = reads.events_for_ledger(tx, self.cursor, list(self._gaps), batch)
                for row in rows:
                    self._apply(row)
                self._expire_gaps()
                if len(rows) < batch:
                    break
            self._prune(tx.now)

    def _apply(self, row: reads.LedgerEvent) -> None:
        if row.id in self._gaps:
            del self._gaps[row.id]
        elif row.id > self.cursor:
            if row.id > self.cursor + 1 and self.cursor > 0:
                seen = time.monotonic()
                for missing in range(self.cursor + 1, min(row.id, self.cursor + 10_001)):
                    self._gaps[missing] = seen
            self.cursor = row.id
        else:
            return  # already applied
        if row.context_id is None or row.to_state is None or row.profile is None:
            return
        current = self._open.pop(row.context_id, None)
        at = row.at
        if current is not None:
            at = max(at, current.since)
            self._close(row.context_id, current, at)
        if row.to_state in UP_STATES:
            state = ContextState(row.to_state)
            self._open[row.context_id] = _Open(row.profile, state, at, row.hourly_cost)

    def _close(self, context_id: str, span: _Open, end: datetime) -> None:
        seconds = (end - span.since).total_seconds()
        self._seconds[(span.profile, span.state)] += seconds
        self._cost[span.profile] += seconds * span.hourly_cost / 3600
        self._intervals.append(
            Interval(context_id, span.profile, span.state, span.since, end, span.hourly_cost)
        )

    def _expire_gaps(self) -> None:
        cutoff = time.monotonic() - self.gap_wait_s
        for gap in [g for g, seen in self._gaps.items() if seen < cutoff]:
            del self._gaps[gap]

    def _prune(self, now: datetime) -> None:
        horizon = now - self.keep
        oldest = self._intervals[0].end if self._intervals else None
        if oldest is not None and oldest < horizon:
            self._intervals = [i for i in self._intervals if i.end is not None and i.end > horizon]

    def seconds(self, now: datetime) -> dict[tuple[str, str], float]:
        """Instance-seconds per (profile, state), open stretches counted up to ``now``."""
        with self._lock:
            totals = dict(self._seconds)
            for span in self._open.values():
                key = (span.profile, span.state)
                totals[key] = totals.get(key, 0.0) + max(0.0, (now - span.since).total_seconds())
        return totals

    def cost(self, now: datetime) -> dict[str, float]:
        """Cost so far per profile (its hourly cost times the time its instances were up)."""
        with self._lock:
            totals = dict(self._cost)
            for span in self._open.values():
                up = max(0.0, (now - span.since).total_seconds())
                totals[span.profile] = totals.get(span.profile, 0.0) + up * span.hourly_cost / 3600
        return totals

    def intervals(self, since: datetime) -> list[Interval]:
        """Stretches that overlap ``[since, now]``; open ones have ``end`` None."""
        with self._lock:
            done = [i for i in self._intervals if i.end is not None and i.end > since]
            live = [
                Interval(cid, o.profile, o.state, o.since, None, o.hourly_cost)
                for cid, o in self._open.items()
            ]
        return done + live
