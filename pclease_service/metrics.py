"""What the service measures, for Prometheus at ``/metrics``.

Two kinds of numbers:

- **Derived from the database at scrape time** (so they survive restarts and agree across
  replicas): contexts by profile and state, live leases, starts, stops by reason, lease
  ends, and the instance-seconds each profile spent in each state. Instance-seconds come
  from the :class:`InstanceLedger`, which folds context transitions from the ``events``
  table incrementally: it reads the whole history once, then only new events.
- **Observed in this process** (reset by a restart, as Prometheus counters may be): lease
  request latency, query latency and outcomes, backend call latency and errors. The
  lease manager and the reconciler call the small functions below; nothing else here
  touches their code.

The instance-seconds families are the point of pclease: ``state="idle"`` is compute that
runs for nobody (the waste the grace period trades against start latency), and the sum
over states is what the backend bills.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pclease_service.dashboard import reads
from pclease_service.states import ContextState, LeaseState

if TYPE_CHECKING:
    from fastapi import FastAPI

    from pclease_service.runtime import Service
    from pclease_service.store import Tx

P = ParamSpec("P")
T = TypeVar("T")

#: Context states during which an instance exists (and costs money).
UP_STATES = (ContextState.STARTING, ContextState.RUNNING, ContextState.IDLE, ContextState.STOPPING)

# -- observed in this process ------------------------------------------------------------------

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_QUERY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600)
QUERY_OUTCOMES = ("succeeded", "failed", "cancelled")
BACKEND_OPERATIONS = ("start", "status", "stop", "list")

# Created unregistered: each app registers them in its own registry (see ``install``), so
# several services in one process (the tests) can each serve /metrics.
LEASE_REQUEST_SECONDS = Histogram(
    "pclease_lease_request_seconds",
    "Time to answer a lease request, waiting for capacity included.",
    ["outcome"],
    buckets=_LATENCY_BUCKETS,
    registry=None,
)
QUERY_SECONDS = Histogram(
    "pclease_query_seconds",
    "Query run time, from submission to its end.",
    ["outcome"],
    buckets=_QUERY_BUCKETS,
    registry=None,
)
BACKEND_CALL_SECONDS = Histogram(
    "pclease_backend_call_seconds",
    "Backend calls made by the reconciler, by operation.",
    ["operation"],
    buckets=_LATENCY_BUCKETS,
    registry=None,
)
BACKEND_ERRORS = Counter(
    "pclease_backend_errors",
    "Backend calls that failed or timed out, by operation.",
    ["operation"],
    registry=None,
)
for _operation in BACKEND_OPERATIONS:
    BACKEND_ERRORS.labels(_operation)


def timed_lease_request(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate ``LeaseManager.acquire``: observe its latency, labelled by outcome."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await fn(*args, **kwargs)
            created = isinstance(result, tuple) and len(result) == 2 and result[1] is True
            outcome = "created" if created else "replayed"
            return result
        except Exception as exc:
            outcome = getattr(exc, "code", "error")
            raise
        finally:
            LEASE_REQUEST_SECONDS.labels(outcome).observe(time.perf_counter() - started)

    return wrapper


async def backend_call(operation: str, call: Awaitable[T]) -> T:
    """Await one backend call, timing it and counting it if it fails."""
    started = time.perf_counter()
    try:
        return await call
    except Exception:
        BACKEND_ERRORS.labels(operation).inc()
        raise
    finally:
        BACKEND_CALL_SECONDS.labels(operation).observe(time.perf_counter() - started)


def query_finished(outcome: str, seconds: float) -> None:
    """Record one query's run time by how it ended (``succeeded``, ``failed``, ``cancelled``);
    the query runner calls it. Outcome counts come from the database (``pclease_queries``)."""
    QUERY_SECONDS.labels(outcome).observe(max(0.0, seconds))


# -- the instance ledger -----------------------------------------------------------------------


@dataclass
class _Open:
    profile: str
    state: str
    since: datetime
    hourly_cost: float


@dataclass(frozen=True)
class Interval:
    """One stretch of one context in one state (``end`` None: still in it)."""

    context_id: str
    profile: str
    state: str
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
        if row.to_state in {s.value for s in UP_STATES}:
            self._open[row.context_id] = _Open(row.profile, row.to_state, at, row.hourly_cost)

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


# -- collected from the database at scrape time -------------------------------------------------


class DatabaseCollector(Collector):
    """Everything that can be read from the database, read once per scrape."""

    def __init__(self, service: Service, ledger: InstanceLedger) -> None:
        self.service = service
        self.ledger = ledger

    def collect(self) -> Iterator[Metric]:
        def read(tx: Tx) -> reads.MetricsSnapshot:
            self.ledger.catch_up(tx)
            return reads.metrics_snapshot(tx)

        snapshot = self.service.db.read_sync(read)
        now = self.service.clock.now()
        profiles = sorted(set(self.service.settings.profiles) | snapshot.profiles())

        contexts = GaugeMetricFamily(
            "pclease_contexts", "Live contexts by profile and state.", labels=["profile", "state"]
        )
        for profile in profiles:
            for state in UP_STATES:
                count = snapshot.contexts.get((profile, state.value), 0)
                contexts.add_metric([profile, state.value], count)
        yield contexts

        leases = GaugeMetricFamily(
            "pclease_leases",
            "Live leases (pending: waiting for their context to start).",
            labels=["profile", "state"],
        )
        ends = CounterMetricFamily(
            "pclease_lease_ends", "Leases that ended, by how.", labels=["profile", "state"]
        )
        for profile in profiles:
            for lease_state in LeaseState:
                count = snapshot.leases.get((profile, lease_state.value), 0)
                family = ends if lease_state.is_terminal else leases
                family.add_metric([profile, lease_state.value], count)
        yield leases
        yield ends

        starts = CounterMetricFamily(
            "pclease_context_starts",
            "Contexts created (each is one backend start).",
            labels=["profile"],
        )
        for profile in profiles:
            starts.add_metric([profile], snapshot.starts.get(profile, 0))
        yield starts

        stops = CounterMetricFamily(
            "pclease_context_stops",
            "Contexts that ended, by reason: idle, max_lifetime, forced, shutdown, "
            "unconfigured, failed, other.",
            labels=["profile", "reason"],
        )
        for (profile, reason), count in sorted(snapshot.stops.items()):
            stops.add_metric([profile, reason], count)
        yield stops

        outcomes = CounterMetricFamily(
            "pclease_queries", "Queries that ended, by outcome.", labels=["outcome"]
        )
        for outcome in QUERY_OUTCOMES:
            outcomes.add_metric([outcome], snapshot.query_outcomes.get(outcome, 0))
        yield outcomes

        seconds = self.ledger.seconds(now)
        instance = CounterMetricFamily(
            "pclease_instance_seconds",
            "Seconds instances existed, by profile and state; state=idle is compute that ran "
            "for no lease.",
            labels=["profile", "state"],
        )
        for profile in profiles:
            for state in UP_STATES:
                instance.add_metric([profile, state.value], seconds.get((profile, state.value), 0))
        yield instance

        cost = self.ledger.cost(now)
        cost_family = CounterMetricFamily(
            "pclease_cost",
            "Cost so far: each context's hourly_cost times its up time.",
            labels=["profile"],
        )
        for profile in profiles:
            cost_family.add_metric([profile], cost.get(profile, 0.0))
        yield cost_family


def build_registry(service: Service, ledger: InstanceLedger) -> CollectorRegistry:
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    collectors: tuple[Collector, ...] = (
        LEASE_REQUEST_SECONDS,
        QUERY_SECONDS,
        BACKEND_CALL_SECONDS,
        BACKEND_ERRORS,
    )
    for collector in collectors:
        registry.register(collector)
    registry.register(DatabaseCollector(service, ledger))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def install(app: FastAPI, service: Service) -> InstanceLedger:
    """Serve ``/metrics`` (unauthenticated, like most Prometheus targets: it holds counts
    and profile names, never ids, holders or secrets). Returns the ledger, which the
    dashboard shares."""
    import anyio.to_thread
    from fastapi import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    ledger = InstanceLedger()
    registry = build_registry(service, ledger)
    app.state.instance_ledger = ledger

    # response_model=None: the return annotation is a string here (fastapi is imported
    # lazily), which FastAPI cannot resolve when it builds the OpenAPI document.
    @app.get(
        "/metrics",
        tags=["health"],
        response_class=Response,
        response_model=None,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def metrics() -> Response:
        body = await anyio.to_thread.run_sync(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return ledger
