"""What the service measures, for Prometheus at ``/metrics``.

Two kinds of numbers:

- **Derived from the database at scrape time** (so they survive restarts and agree across
  replicas): contexts by profile and state, live leases, starts, stops by reason, lease
  ends, and the instance-seconds each profile spent in each state. Instance-seconds come
  from the :class:`~pclease_service.ledger.InstanceLedger`, which folds context
  transitions from the ``events`` table incrementally.
- **Observed in this process** (reset by a restart, as Prometheus counters may be): lease
  request latency, query latency and outcomes, backend call latency and errors. Domain
  code records them into :class:`PrometheusInstruments` (through the
  :class:`~pclease_service.instruments.Instruments` interface) and never imports this
  module.

The instance-seconds families are the point of pclease: ``state="idle"`` is compute that
runs for nobody (the waste the grace period trades against start latency), and the sum
over states is what the backend bills.

Usage per token (``pclease_token_*``) is labelled by the token's *name*, the one given to
``pclease token create``: operators choose names and there are few of them, so the label's
cardinality stays bounded by the number of tokens (and profiles); a token's value or id
never appears. ``pclease_token_quota_limit`` gives each configured limit beside it, so
``used / limit`` is one PromQL division.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.ledger import UP_STATES, InstanceLedger
from pclease_service.quotas import QuotaBook, TokenUsage, usage_by_name
from pclease_service.states import LeaseState
from pclease_service.store import reads

if TYPE_CHECKING:
    from fastapi import FastAPI

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


class PrometheusInstruments:
    """The :class:`~pclease_service.instruments.Instruments` the service records into."""

    def lease_request(self, outcome: str, seconds: float) -> None:
        LEASE_REQUEST_SECONDS.labels(outcome).observe(max(0.0, seconds))

    def backend_call(self, operation: str, seconds: float, *, failed: bool) -> None:
        if failed:
            BACKEND_ERRORS.labels(operation).inc()
        BACKEND_CALL_SECONDS.labels(operation).observe(max(0.0, seconds))

    def query_finished(self, outcome: str, seconds: float) -> None:
        # Outcome counts come from the database (``pclease_queries``); this is run time.
        QUERY_SECONDS.labels(outcome).observe(max(0.0, seconds))


# -- collected from the database at scrape time -------------------------------------------------


class DatabaseCollector(Collector):
    """Everything that can be read from the database, read once per scrape."""

    def __init__(
        self,
        db: Database,
        now: Callable[[], datetime],
        profiles: Mapping[str, object],
        ledger: InstanceLedger,
        quotas: QuotaBook | None = None,
    ) -> None:
        self.db = db
        self.now = now
        self.configured = profiles
        self.ledger = ledger
        self.quotas = quotas

    def collect(self) -> Iterator[Metric]:
        def read(tx: Tx) -> tuple[reads.MetricsSnapshot, dict[str, TokenUsage]]:
            self.ledger.catch_up(tx)
            return reads.metrics_snapshot(tx), usage_by_name(tx)

        snapshot, usage = self.db.read_sync(read)
        yield from _token_families(usage, self.quotas)
        now = self.now()
        profiles = sorted(set(self.configured) | snapshot.profiles())

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


def _token_families(usage: Mapping[str, TokenUsage], book: QuotaBook | None) -> Iterator[Metric]:
    leases = GaugeMetricFamily(
        "pclease_token_live_leases", "Pending and active leases, by token.", labels=["token"]
    )
    contexts = GaugeMetricFamily(
        "pclease_token_live_contexts",
        "Live contexts a token's lease requests started, by token and profile.",
        labels=["token", "profile"],
    )
    hours = GaugeMetricFamily(
        "pclease_token_instance_hours_today",
        "Hours the contexts a token started were up in the current UTC day.",
        labels=["token"],
    )
    cost = GaugeMetricFamily(
        "pclease_token_cost_this_month",
        "Cost of the contexts a token started, in the current UTC month, by profile.",
        labels=["token", "profile"],
    )
    for name, used in sorted(usage.items()):
        leases.add_metric([name], used.live_leases)
        for profile, count in sorted(used.live_contexts.items()):
            contexts.add_metric([name, profile], count)
        hours.add_metric([name], used.instance_hours_today)
        for profile, spent in sorted(used.cost_this_month.items()):
            cost.add_metric([name, profile], spent)
    yield from (leases, contexts, hours, cost)

    limits = GaugeMetricFamily(
        "pclease_token_quota_limit",
        "Each token's configured limits (quota: live_leases, live_contexts, "
        "instance_hours_per_day, monthly_budget; profile empty for token-wide ones), for "
        "the tokens that use something or have an entry of their own.",
        labels=["token", "quota", "profile"],
    )
    if book is not None:
        for name in sorted(set(usage) | set(book.settings.tokens)):
            quota = book.for_token(name)
            if quota.max_live_leases is not None:
                limits.add_metric([name, "live_leases", ""], quota.max_live_leases)
            if quota.max_instance_hours_per_day is not None:
                limits.add_metric(
                    [name, "instance_hours_per_day", ""], quota.max_instance_hours_per_day
                )
            for profile, per in sorted(quota.profiles.items()):
                if per.max_live_contexts is not None:
                    limits.add_metric([name, "live_contexts", profile], per.max_live_contexts)
                if per.monthly_budget is not None:
                    limits.add_metric([name, "monthly_budget", profile], per.monthly_budget)
    yield limits


def build_registry(collector: DatabaseCollector) -> CollectorRegistry:
    from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    collectors: tuple[Collector, ...] = (
        LEASE_REQUEST_SECONDS,
        QUERY_SECONDS,
        BACKEND_CALL_SECONDS,
        BACKEND_ERRORS,
        collector,
    )
    for item in collectors:
        registry.register(item)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def install(
    app: FastAPI,
    db: Database,
    now: Callable[[], datetime],
    profiles: Mapping[str, object],
    ledger: InstanceLedger,
    quotas: QuotaBook | None = None,
) -> None:
    """Serve ``/metrics`` (unauthenticated, like most Prometheus targets: it holds counts,
    profile names and token names, never ids, holders or secrets)."""
    import anyio.to_thread
    from fastapi import Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = build_registry(DatabaseCollector(db, now, profiles, ledger, quotas))

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
