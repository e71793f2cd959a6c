"""The fake service: what its routes call, the knobs that make things go wrong, and its
state to inspect. The rules live in :mod:`pclease_client.testing.records`.

No HTTP here (that is :mod:`pclease_client.testing.routes`) and no clock of its own:
nothing expires or stops by time. Whatever time would do, a test does with a knob
(:meth:`FakeService.expire`, :meth:`FakeService.end_idle_grace`...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from pclease_client.errors import (
    ApiError,
    BudgetExhausted,
    CapacityExhausted,
    Conflict,
    IdempotencyConflict,
    IllegalTransition,
    InvalidInput,
    PlanRefused,
    QuotaExceeded,
    QuotaName,
    QuotaUse,
    UnknownProfile,
    api_error,
)
from pclease_client.models import (
    ContextInfo,
    DistributedInfo,
    EventInfo,
    LeaseInfo,
    ProfileInfo,
    QueryInfo,
)
from pclease_client.states import ContextState, LeaseState, QueryState, StopKind
from pclease_client.testing.records import (
    QueryHandler,
    QueryOutcome,
    Records,
    SubmittedQuery,
    refusal,
)

#: How a new context comes up: it runs (or fails) when a client first waits for it, or it
#: stays starting until the test calls :meth:`FakeService.start_context`.
Starts = Literal["run", "fail", "hold"]
#: The token the fake accepts unless told another.
FAKE_TOKEN = "fake-token"  # noqa: S105 (not a secret: the fake's own)


def fake_profile(name: str, **overrides: Any) -> ProfileInfo:
    """A profile for the fake: one context of up to eight leases unless overridden."""
    shape: dict[str, Any] = {
        "name": name,
        "cpus": 1,
        "memory_gb": 1.0,
        "cluster_size": 1,
        "instance_type": None,
        "storage_gb": None,
        "workspace": None,
        "labels": {},
        "idle_grace_s": 60.0,
        "max_leases_per_context": 8,
        "max_contexts": 1,
        "max_lifetime_s": None,
        "hourly_cost": 0.0,
        "concurrent_queries": 1,
    }
    unknown = set(overrides) - set(shape)
    if unknown:
        raise TypeError(f"not profile fields: {', '.join(sorted(unknown))}")
    return ProfileInfo.from_json({**shape, **overrides})


@dataclass
class _Failure:
    status: int
    code: str
    message: str
    left: int


class FakeService(Records):
    """In-memory leases, contexts, queries and events with the service's rules, knobs to
    make things go wrong, and inspectable state. Safe to use from several threads."""

    def __init__(
        self,
        profiles: Iterable[str | ProfileInfo] = ("small", "large"),
        *,
        token: str = FAKE_TOKEN,
        lease_ttl_s: float = 60.0,
        starts: Starts = "run",
        now: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__([fake_profile(p) if isinstance(p, str) else p for p in profiles], now=now)
        self.token = token
        self.lease_ttl_s = lease_ttl_s
        #: How new contexts come up (see :data:`Starts`); may be changed at any time.
        self.starts: Starts = starts
        #: Every request the fake answered, as ``"METHOD /path?query"``.
        self.requests: list[str] = []
        #: Idempotency-Key: the lease it made and the request it came with.
        self._idempotency: dict[str, tuple[str, Any]] = {}
        self._failures: list[_Failure] = []
        self._handler: QueryHandler = lambda query: QueryOutcome()
        self._scans: Callable[[SubmittedQuery], Iterable[str]] = lambda query: ()
        self._max_live_leases: int | None = None
        self._max_live_contexts: dict[str, int] = {}
        #: What :meth:`exhaust` used up, by profile (None: every profile).
        self._exhausted: dict[str | None, QuotaUse] = {}

    # -- inspection ------------------------------------------------------------------------

    def leases(self, *, state: LeaseState | None = None) -> list[LeaseInfo]:
        """Every lease, oldest first (only those in ``state`` if given)."""
        with self._changed:
            return [x for x in self._leases.values() if state is None or x.state is state]

    def lease(self, lease_id: str) -> LeaseInfo:
        with self._changed:
            return self._lease(lease_id)

    def contexts(self) -> list[ContextInfo]:
        with self._changed:
            return [self._costed(c) for c in self._contexts.values()]

    def context(self, context_id: str) -> ContextInfo:
        with self._changed:
            return self._costed(self._context(context_id))

    def queries(self, *, lease_id: str | None = None) -> list[QueryInfo]:
        with self._changed:
            return [q for q in self._queries.values() if lease_id in (None, q.lease_id)]

    def query(self, query_id: str) -> QueryInfo:
        with self._changed:
            return self._query(query_id)

    def submitted(self, query_id: str) -> SubmittedQuery:
        """What was sent for ``query_id``: its options and its plan's bytes."""
        with self._changed:
            return self._submitted[query_id]

    def events(self) -> list[EventInfo]:
        """The audit log, oldest first."""
        with self._changed:
            return list(self._events)

    # -- knobs -----------------------------------------------------------------------------

    def answer_queries(self, handler: QueryHandler) -> None:
        """Decide how each query submitted from now on ends (default: it succeeds)."""
        with self._changed:
            self._handler = handler

    def report_inputs(self, scans: Callable[[SubmittedQuery], Iterable[str]]) -> None:
        """Say what each query submitted from now on reads (its lineage ``inputs``; the
        fake does not decode plans, so by default it reads nothing). Its ``outputs`` are
        its destination, as the service reports a sink's."""
        with self._changed:
            self._scans = scans

    def fail_queries(self, error_type: str, message: str) -> None:
        """Every query from now on fails with Polars' ``error_type``."""
        self.answer_queries(lambda query: QueryOutcome.failed(error_type, message))

    def finish_query(self, query_id: str, outcome: QueryOutcome) -> QueryInfo:
        """End a query left running by the query handler."""
        with self._changed:
            query = self._query(query_id)
            if query.state.is_terminal:
                raise refusal(IllegalTransition, f"query {query_id} ended")
            return self._finish(query, outcome)

    def fail_requests(
        self,
        count: int = 1,
        *,
        status: int = 503,
        code: str = "database_busy",
        message: str = "the fake service is briefly unavailable; retry",
    ) -> None:
        """Answer the next ``count`` requests with this error instead (what the client's
        retries are for)."""
        with self._changed:
            self._failures.append(_Failure(status, code, message, count))

    def start_context(self, context_id: str) -> ContextInfo:
        """A starting context runs: its pending leases become active."""
        with self._changed:
            context = self._context(context_id)
            if context.state is not ContextState.STARTING:
                raise refusal(IllegalTransition, f"context {context_id} is {context.state.value}")
            now = self._now()
            if context.refcount:
                self._set_context(
                    context, "fake", "started", state=ContextState.RUNNING, started_at=now
                )
            else:  # its leases ended while it started
                self._set_context(
                    context,
                    "fake",
                    "started",
                    state=ContextState.IDLE,
                    started_at=now,
                    idle_since=now,
                    stops_at=now + timedelta(seconds=self._grace(context)),
                )
            for lease in self._live_leases(context_id):
                self._set_lease(lease, "fake", "its context runs", LeaseState.ACTIVE)
            return self._context(context_id)

    def fail_context(self, context_id: str, reason: str = "the instance died") -> ContextInfo:
        """The context fails: its leases fail, their queries are cancelled."""
        with self._changed:
            self._stop(self._context(context_id), ContextState.FAILED, StopKind.FAILED, reason)
            for lease in self._live_leases(context_id):
                self._end_lease(lease, LeaseState.FAILED, f"its context failed: {reason}", "fake")
            return self.context(context_id)

    def stop_context(self, context_id: str, *, actor: str = "fake") -> ContextInfo:
        """An admin stops the context: its leases are revoked, their queries cancelled."""
        with self._changed:
            context = self._context(context_id)
            if context.state.is_terminal:
                raise refusal(
                    IllegalTransition,
                    f"context {context_id} is {context.state.value} already",
                )
            reason = f"context {context_id} was stopped by {actor}"
            self._stop(context, ContextState.STOPPED, StopKind.FORCED, reason, actor)
            for lease in self._live_leases(context_id):
                self._end_lease(lease, LeaseState.REVOKED, reason, actor)
            return self.context(context_id)

    def revoke(self, lease_id: str, reason: str = "revoked by an admin") -> LeaseInfo:
        """End one lease underneath its holder (its queries are cancelled)."""
        with self._changed:
            return self._end_live(lease_id, LeaseState.REVOKED, reason)

    def expire(self, lease_id: str) -> LeaseInfo:
        """The lease's TTL ran out (what a stalled holder causes)."""
        with self._changed:
            lease = self._lease(lease_id)
            reason = f"no heartbeat for {lease.ttl_s:g} s"
            return self._end_live(lease_id, LeaseState.EXPIRED, reason)

    def end_idle_grace(self) -> list[ContextInfo]:
        """Stop every idle context, as its idle grace running out would."""
        with self._changed:
            idle = [c for c in self._contexts.values() if c.state is ContextState.IDLE]
            return [
                self._stop(c, ContextState.STOPPED, StopKind.IDLE, "its idle grace ran out")
                for c in idle
            ]

    def set_quota(
        self,
        *,
        max_live_leases: int | None = None,
        max_live_contexts: Mapping[str, int] | None = None,
    ) -> None:
        """The fake token's quota, as ``[quotas]`` sets it (None: no limit): a lease past
        ``max_live_leases``, or one that would start a context of a profile past its
        ``max_live_contexts``, is refused with 429 ``quota_exceeded``. Joining a context
        with room is never refused by ``max_live_contexts``, as in the service."""
        with self._changed:
            self._max_live_leases = max_live_leases
            self._max_live_contexts = dict(max_live_contexts or {})

    def exhaust(
        self,
        quota: QuotaName,
        *,
        used: float,
        limit: float,
        profile: str | None = None,
        frees_at: datetime | None = None,
    ) -> None:
        """From now on, a lease that would start a context (of ``profile``, or of any
        profile) is refused as if the fake token had used up ``quota``: 403
        ``budget_exhausted`` for ``MONTHLY_BUDGET``, else 429 ``quota_exceeded``. The
        fake has no clock, so a spent day or month is this knob; :meth:`set_quota` clears
        nothing here, :meth:`restore` does."""
        if quota in (QuotaName.LIVE_LEASES, QuotaName.LIVE_CONTEXTS):
            raise ValueError(f"{quota.value} follows from the fake's leases: use set_quota")
        with self._changed:
            self._exhausted[profile] = QuotaUse(quota, used, limit, profile, frees_at)

    def restore(self) -> None:
        """Forget what :meth:`exhaust` used up."""
        with self._changed:
            self._exhausted.clear()

    def _admit_lease(self) -> None:
        limit = self._max_live_leases
        if limit is None:
            return
        used = sum(not lease.state.is_terminal for lease in self._leases.values())
        if used >= limit:
            raise QuotaExceeded(
                429,
                "quota_exceeded",
                f"token 'fake' holds {used} live lease(s) and its quota max_live_leases is "
                f"{limit}; release one of them (or let one end) and retry after 30 s",
                retry_after_s=30,
                quota=QuotaUse(QuotaName.LIVE_LEASES, used, limit),
            )

    def _admit_start(self, profile: str, live: int) -> None:
        limit = self._max_live_contexts.get(profile)
        if limit is not None and live >= limit:
            raise QuotaExceeded(
                429,
                "quota_exceeded",
                f"token 'fake' started {live} live context(s) of profile {profile!r} and "
                f"its quota max_live_contexts for it is {limit}; none of them has room for "
                "another lease. Retry after 30 s",
                retry_after_s=30,
                quota=QuotaUse(QuotaName.LIVE_CONTEXTS, live, limit, profile),
            )
        use = self._exhausted.get(profile) or self._exhausted.get(None)
        if use is None:
            return
        message = (
            f"token 'fake' used {use.used:g} of its {use.name.value} of {use.limit:g}"
            + (f" on profile {profile!r}" if use.profile else "")
            + "; leases that join a running context still work"
        )
        if use.name is QuotaName.MONTHLY_BUDGET:
            raise BudgetExhausted(403, "budget_exhausted", message, quota=use)
        retry = 30
        if use.frees_at is not None:
            retry = max(1, int((use.frees_at - self._now()).total_seconds()))
        raise QuotaExceeded(429, "quota_exceeded", message, retry_after_s=retry, quota=use)

    # -- the API (what the routes call) ----------------------------------------------------

    def take_failure(self) -> ApiError | None:
        """The error the next request answers with, if the test asked for one."""
        with self._changed:
            if not self._failures:
                return None
            failure = self._failures[0]
            failure.left -= 1
            if failure.left <= 0:
                self._failures.pop(0)
            return api_error(failure.status, failure.code, failure.message)

    def create_lease(
        self,
        profile: str,
        holder: Mapping[str, Any],
        *,
        ttl_s: float | None = None,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[LeaseInfo, bool]:
        """A lease and whether it is new (False: an ``Idempotency-Key`` replay)."""
        shape = self.profiles.get(profile)
        if shape is None:
            known = ", ".join(sorted(self.profiles)) or "(none configured)"
            raise refusal(
                UnknownProfile,
                f"unknown profile {profile!r}; configured profiles are: {known}",
            )
        request = (profile, dict(holder), ttl_s)
        with self._changed:
            if idempotency_key is not None and idempotency_key in self._idempotency:
                lease_id, first = self._idempotency[idempotency_key]
                if first != request:
                    raise refusal(
                        IdempotencyConflict,
                        "this Idempotency-Key came with a different request; use a new key",
                    )
                return self._leases[lease_id], False
            self._admit_lease()
            context = self._wait(
                lambda: self._room(shape, lambda live: self._admit_start(profile, live)),
                wait_s or 0.0,
            )
            if context is None:
                raise CapacityExhausted(
                    429,
                    "capacity_exhausted",
                    f"profile {profile!r} is at capacity ({shape.max_contexts} context(s) of "
                    f"{shape.max_leases_per_context} leases each); retry after 5 s or pass "
                    "a longer wait_s",
                    retry_after_s=5,
                )
            lease = self._join(context, holder, ttl_s or self.lease_ttl_s)
            if idempotency_key is not None:
                self._idempotency[idempotency_key] = (lease.id, request)
            return lease, True

    def get_lease(
        self, lease_id: str, *, wait_s: float = 0.0, while_state: LeaseState | None = None
    ) -> LeaseInfo:
        with self._changed:
            lease = self._lease(lease_id)
            state = while_state or lease.state
            if wait_s > 0 and lease.state is LeaseState.PENDING and state is LeaseState.PENDING:
                self._boot(lease.context_id)
            self._wait(lambda: self._lease(lease_id).state is not state or None, wait_s)
            return self._lease(lease_id)

    def list_leases(
        self,
        *,
        states: Iterable[LeaseState] = (),
        context_id: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        limit: int = 500,
    ) -> list[LeaseInfo]:
        wanted = set(states)
        with self._changed:
            found = [
                x
                for x in reversed(self._leases.values())
                if (not wanted or x.state in wanted)
                and context_id in (None, x.context_id)
                and dag_id in (None, x.holder.get("dag_id"))
                and run_id in (None, x.holder.get("run_id"))
            ]
            return found[:limit]

    def heartbeat(self, lease_id: str) -> LeaseInfo:
        with self._changed:
            lease = self._lease(lease_id)
            if lease.state.is_terminal:
                raise self._ended(lease)
            now = self._now()
            lease = replace(
                lease, heartbeat_at=now, expires_at=now + timedelta(seconds=lease.ttl_s)
            )
            self._leases[lease.id] = lease
            return lease

    def release(self, lease_id: str, *, actor: str = "client") -> LeaseInfo:
        """Release (a lease that ended already is answered as it is)."""
        with self._changed:
            lease = self._lease(lease_id)
            if lease.state.is_terminal:
                return lease
            return self._end_lease(lease, LeaseState.RELEASED, f"released by {actor}", actor)

    def release_holder(
        self,
        dag_id: str,
        run_id: str,
        *,
        task_id: str | None = None,
        map_index: int | None = None,
        actor: str = "client",
    ) -> list[LeaseInfo]:
        with self._changed:
            mine = [
                x
                for x in self._leases.values()
                if not x.state.is_terminal
                and x.holder.get("dag_id") == dag_id
                and x.holder.get("run_id") == run_id
                and task_id in (None, x.holder.get("task_id"))
                and map_index in (None, x.holder.get("map_index"))
            ]
            reason = f"released with its holder {dag_id}/{run_id}" + (
                f"/{task_id}" if task_id else ""
            )
            return [self._end_lease(x, LeaseState.RELEASED, reason, actor) for x in mine]

    def list_contexts(
        self,
        *,
        states: Iterable[ContextState] = (),
        profile: str | None = None,
        limit: int = 500,
    ) -> list[ContextInfo]:
        wanted = set(states)
        with self._changed:
            found = [
                self._costed(c)
                for c in reversed(self._contexts.values())
                if (not wanted or c.state in wanted) and profile in (None, c.profile)
            ]
            return found[:limit]

    def list_events(
        self,
        *,
        context_id: str | None = None,
        lease_id: str | None = None,
        after_id: int | None = None,
        limit: int = 200,
    ) -> list[EventInfo]:
        with self._changed:
            found = [
                e
                for e in reversed(self._events)
                if context_id in (None, e.context_id)
                and lease_id in (None, e.lease_id)
                and (after_id is None or e.id > after_id)
            ]
            return found[:limit]

    def submit(self, lease_id: str, plan: bytes, options: Mapping[str, Any]) -> QueryInfo:
        """Queue a query; the query handler decides at once how it ends, and the answer
        shows it queued, as the service's does."""
        target = options.get("target")
        if target not in ("collect", "parquet", "csv", "ipc", "ndjson"):
            raise refusal(
                InvalidInput, "options.target: must be collect, parquet, csv, ipc or ndjson"
            )
        if not plan:
            raise PlanRefused(422, "plan_invalid", "the plan is empty; send Polars' plan bytes")
        with self._changed:
            lease = self._lease(lease_id)
            if lease.state.is_terminal:
                raise self._ended(lease)
            now = self._now()
            destination = options.get("destination")
            draft = SubmittedQuery("", lease.id, lease.context_id, dict(options), plan)
            query = QueryInfo(
                id=self._id("query"),
                lease_id=lease.id,
                context_id=lease.context_id,
                state=QueryState.QUEUED,
                target=str(target),
                destination=destination,
                engine=str(options.get("engine") or "auto"),
                labels=dict(options.get("labels") or {}),
                plan_bytes=len(plan),
                timeout_s=float(options.get("timeout_s") or 3600.0),
                created_at=now,
                started_at=None,
                finished_at=None,
                duration_s=None,
                rows=None,
                result_bytes=None,
                output=None,
                inputs=tuple(str(path) for path in self._scans(draft)),
                outputs=(str(destination),) if destination and target != "collect" else (),
                error=None,
                distributed=_distributed(options.get("distributed")),
                # The fake runs every query at once: it is next in line, and starts now.
                queue_position=1,
                queued_s=0.0,
            )
            self._queries[query.id] = query
            submitted = SubmittedQuery(query.id, lease.id, lease.context_id, dict(options), plan)
            self._submitted[query.id] = submitted
            self._event("query", "client", "submitted", lease.context_id, lease.id, None, "queued")
            outcome = self._handler(submitted)
            current = self._query(query.id)
            # The handler may have ended the lease, which cancelled the query already.
            if not current.state.is_terminal:
                if outcome is None:
                    self._queries[query.id] = replace(
                        current,
                        state=QueryState.RUNNING,
                        started_at=now,
                        queue_position=None,
                        queued_s=0.0,
                    )
                else:
                    self._finish(current, outcome)
            return query

    def get_query(self, query_id: str, *, wait_s: float = 0.0) -> QueryInfo:
        with self._changed:
            self._query(query_id)
            self._wait(lambda: self._query(query_id).state.is_terminal or None, wait_s)
            return self._query(query_id)

    def cancel_query(self, query_id: str) -> QueryInfo:
        with self._changed:
            query = self._query(query_id)
            if query.state.is_terminal:
                return query
            return self._cancel(query, "cancelled by its client")

    def result(self, query_id: str) -> bytes:
        with self._changed:
            query = self._query(query_id)
            if query.target != "collect":
                raise refusal(
                    Conflict,
                    f"query {query_id} is a {query.target} sink; its output is at "
                    f"{query.destination}, there is no result to download",
                )
            if query.state is not QueryState.SUCCEEDED:
                raise refusal(
                    Conflict,
                    f"query {query_id} is {query.state.value}; wait for it before fetching "
                    "its result",
                )
            return self._results[query_id]

    def _boot(self, context_id: str) -> None:
        context = self._context(context_id)
        if context.state is not ContextState.STARTING or self.starts == "hold":
            return
        if self.starts == "fail":
            self.fail_context(context_id, "the fake was told to fail starts")
        else:
            self.start_context(context_id)


_DISTRIBUTED_DEFAULTS: dict[str, Any] = {
    "min_workers": None,
    "max_workers": None,
    "shuffle_compression": "auto",
    "shuffle_format": "auto",
    "shuffle_compression_level": None,
    "equi_join_broadcast_limit": 256 * 1024**2,
    "partitions_per_worker": None,
    "single_worker_ops": "auto",
    "expression_lowering": None,
}


def _distributed(asked: object) -> DistributedInfo | None:
    """What the service records for a submission's ``distributed`` option, on a profile
    without distributed defaults that can run it (the fake refuses nothing here)."""
    if asked is None or asked is False:
        return None
    given = asked if isinstance(asked, Mapping) else {}
    unknown = set(given) - set(_DISTRIBUTED_DEFAULTS)
    if unknown:
        raise refusal(InvalidInput, f"options.distributed: unknown option(s) {sorted(unknown)}")
    return DistributedInfo.from_json({**_DISTRIBUTED_DEFAULTS, **given})
