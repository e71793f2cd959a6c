"""The fake service's state and rules, in memory: leases share contexts by refcount,
contexts go idle when their last lease ends, queries end as the test says.

No HTTP here (that is :mod:`pclease_client.testing.routes`) and no clock of its own:
nothing expires or stops by time. Whatever time would do, a test does with a knob
(:meth:`FakeService.expire`, :meth:`FakeService.end_idle_grace`...).
"""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pclease_client.errors import (
    ApiError,
    CapacityExhausted,
    Conflict,
    ContextNotFound,
    IdempotencyConflict,
    IllegalTransition,
    InvalidInput,
    LeaseEnded,
    LeaseNotFound,
    QueryNotFound,
    UnknownProfile,
    api_error,
)
from pclease_client.models import (
    ContextInfo,
    EventInfo,
    LeaseInfo,
    ProfileInfo,
    QueryErrorInfo,
    QueryInfo,
)
from pclease_client.states import ContextState, LeaseState, QueryState, StopKind

#: How a new context comes up: it runs (or fails) when a client first waits for it, or it
#: stays starting until the test calls :meth:`FakeService.start_context`.
Starts = Literal["run", "fail", "hold"]
#: The token the fake accepts unless told another.
FAKE_TOKEN = "fake-token"  # noqa: S105 (not a secret: the fake's own)
#: The longest a long poll waits, as on the service.
LONG_POLL_MAX_S = 60.0
_JOINABLE = (ContextState.STARTING, ContextState.RUNNING, ContextState.IDLE)


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
    }
    unknown = set(overrides) - set(shape)
    if unknown:
        raise TypeError(f"not profile fields: {', '.join(sorted(unknown))}")
    return ProfileInfo.from_json({**shape, **overrides})


@dataclass(frozen=True)
class SubmittedQuery:
    """A query as the fake received it: what a query handler decides on."""

    id: str
    lease_id: str
    context_id: str
    #: The submission's options: target, destination, engine, labels, polars_version...
    options: Mapping[str, Any]
    #: The plan's bytes, exactly as sent.
    plan: bytes

    @property
    def target(self) -> str:
        return str(self.options.get("target"))

    @property
    def labels(self) -> Mapping[str, str]:
        return dict(self.options.get("labels") or {})


@dataclass(frozen=True)
class QueryOutcome:
    """How the fake ends a query: succeeded (with ``rows`` and, for a collect, ``result``,
    a Polars DataFrame or Arrow IPC bytes) or, with ``error_type``, failed."""

    rows: int | None = None
    result: Any = None
    error_type: str | None = None
    error_message: str = ""

    @classmethod
    def failed(cls, error_type: str, message: str) -> QueryOutcome:
        """A failure as Polars raises it: ``failed("ColumnNotFoundError", "...")``."""
        return cls(error_type=error_type, error_message=message)


#: Decides each query's end when it is submitted; None leaves it running until the test
#: calls :meth:`FakeService.finish_query` (or its lease ends, which cancels it).
QueryHandler = Callable[[SubmittedQuery], QueryOutcome | None]


@dataclass
class _Failure:
    status: int
    code: str
    message: str
    left: int


@dataclass
class _Extra:
    """What the fake keeps beside the models."""

    submitted: dict[str, SubmittedQuery] = field(default_factory=dict)
    results: dict[str, bytes] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, Any]] = field(default_factory=dict)


class FakeService:
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
        self.token = token
        self.lease_ttl_s = lease_ttl_s
        #: How new contexts come up (see :data:`Starts`); may be changed at any time.
        self.starts: Starts = starts
        self.profiles: dict[str, ProfileInfo] = {}
        for profile in profiles:
            info = fake_profile(profile) if isinstance(profile, str) else profile
            self.profiles[info.name] = info
        #: Every request the fake answered, as ``"METHOD /path?query"``.
        self.requests: list[str] = []
        self._now = now or (lambda: datetime.now(UTC))
        self._changed = threading.Condition(threading.RLock())
        self._closed = False
        self._ids = itertools.count(1)
        self._leases: dict[str, LeaseInfo] = {}
        self._contexts: dict[str, ContextInfo] = {}
        self._queries: dict[str, QueryInfo] = {}
        self._events: list[EventInfo] = []
        self._extra = _Extra()
        self._failures: list[_Failure] = []
        self._handler: QueryHandler = lambda query: QueryOutcome()

    def close(self) -> None:
        """End every long poll now (and any that comes later at once)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

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
            return self._extra.submitted[query_id]

    def events(self) -> list[EventInfo]:
        """The audit log, oldest first."""
        with self._changed:
            return list(self._events)

    # -- knobs -----------------------------------------------------------------------------

    def answer_queries(self, handler: QueryHandler) -> None:
        """Decide how each query submitted from now on ends (default: it succeeds)."""
        with self._changed:
            self._handler = handler

    def fail_queries(self, error_type: str, message: str) -> None:
        """Every query from now on fails with Polars' ``error_type``."""
        self.answer_queries(lambda query: QueryOutcome.failed(error_type, message))

    def finish_query(self, query_id: str, outcome: QueryOutcome) -> QueryInfo:
        """End a query left running by the query handler."""
        with self._changed:
            query = self._query(query_id)
            if query.state.is_terminal:
                raise IllegalTransition(409, "illegal_transition", f"query {query_id} ended")
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
                raise IllegalTransition(
                    409, "illegal_transition", f"context {context_id} is {context.state.value}"
                )
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
                raise IllegalTransition(
                    409,
                    "illegal_transition",
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
            raise UnknownProfile(
                422,
                "unknown_profile",
                f"unknown profile {profile!r}; configured profiles are: {known}",
            )
        request = (profile, dict(holder), ttl_s)
        with self._changed:
            if idempotency_key is not None and idempotency_key in self._extra.idempotency:
                lease_id, first = self._extra.idempotency[idempotency_key]
                if first != request:
                    raise IdempotencyConflict(
                        409,
                        "idempotency_key_reused",
                        "this Idempotency-Key came with a different request; use a new key",
                    )
                return self._leases[lease_id], False
            context = self._wait(lambda: self._room(shape), wait_s or 0.0)
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
                self._extra.idempotency[idempotency_key] = (lease.id, request)
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
            raise InvalidInput(
                422, "invalid_input", "options.target: must be collect, parquet, csv, ipc or ndjson"
            )
        if not plan:
            raise InvalidInput(422, "plan_invalid", "the plan is empty; send Polars' plan bytes")
        with self._changed:
            lease = self._lease(lease_id)
            if lease.state.is_terminal:
                raise self._ended(lease)
            now = self._now()
            query = QueryInfo(
                id=self._id("query"),
                lease_id=lease.id,
                context_id=lease.context_id,
                state=QueryState.QUEUED,
                target=str(target),
                destination=options.get("destination"),
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
                error=None,
            )
            self._queries[query.id] = query
            submitted = SubmittedQuery(query.id, lease.id, lease.context_id, dict(options), plan)
            self._extra.submitted[query.id] = submitted
            self._event("query", "client", "submitted", lease.context_id, lease.id, None, "queued")
            outcome = self._handler(submitted)
            if self._query(query.id).state.is_terminal:
                pass  # the handler ended its lease, which cancelled it
            elif outcome is None:
                self._queries[query.id] = replace(
                    self._query(query.id), state=QueryState.RUNNING, started_at=now
                )
            else:
                self._finish(self._query(query.id), outcome)
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
                raise Conflict(
                    409,
                    "conflict",
                    f"query {query_id} is a {query.target} sink; its output is at "
                    f"{query.destination}, there is no result to download",
                )
            if query.state is not QueryState.SUCCEEDED:
                raise Conflict(
                    409,
                    "conflict",
                    f"query {query_id} is {query.state.value}; wait for it before fetching "
                    "its result",
                )
            return self._extra.results[query_id]

    # -- rules -----------------------------------------------------------------------------

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    def _wait(self, ready: Callable[[], Any], wait_s: float) -> Any:
        """What ``ready()`` returns once it is not None, or None after ``wait_s`` (or when
        the fake closes). Called with the lock held."""
        result = None

        def done() -> bool:
            nonlocal result
            result = ready()
            return result is not None or self._closed

        self._changed.wait_for(done, timeout=min(max(wait_s, 0.0), LONG_POLL_MAX_S))
        return result

    def _lease(self, lease_id: str) -> LeaseInfo:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(
                404,
                "lease_not_found",
                f"no lease {lease_id!r}; list your leases with GET /v1/leases",
            )
        return lease

    def _context(self, context_id: str) -> ContextInfo:
        context = self._contexts.get(context_id)
        if context is None:
            raise ContextNotFound(
                404,
                "context_not_found",
                f"no context {context_id!r}; list contexts with GET /v1/contexts",
            )
        return context

    def _query(self, query_id: str) -> QueryInfo:
        query = self._queries.get(query_id)
        if query is None:
            raise QueryNotFound(404, "query_not_found", f"no query {query_id!r}")
        return query

    def _ended(self, lease: LeaseInfo) -> LeaseEnded:
        why = f" ({lease.end_reason})" if lease.end_reason else ""
        return LeaseEnded(
            410,
            "lease_ended",
            f"lease {lease.id} has ended: it is {lease.state.value}{why}; request a new lease "
            "with POST /v1/leases",
        )

    def _live_leases(self, context_id: str) -> list[LeaseInfo]:
        return [
            x
            for x in self._leases.values()
            if x.context_id == context_id and not x.state.is_terminal
        ]

    def _room(self, shape: ProfileInfo) -> ContextInfo | None:
        """A context of the profile a new lease may join, made if need be; None if full."""
        live = [
            c
            for c in self._contexts.values()
            if c.profile == shape.name and not c.state.is_terminal
        ]
        for context in live:
            if context.state in _JOINABLE and context.refcount < shape.max_leases_per_context:
                return context
        if len(live) >= shape.max_contexts:
            return None
        context = ContextInfo(
            id=self._id("context"),
            profile=shape.name,
            backend="fake",
            state=ContextState.STARTING,
            refcount=0,
            leases_total=0,
            created_at=self._now(),
            started_at=None,
            idle_since=None,
            stops_at=None,
            stopping_since=None,
            stopped_at=None,
            stop_reason=None,
            stop_kind=None,
            status_message=None,
            hourly_cost=shape.hourly_cost,
            cost_so_far=0.0,
        )
        self._contexts[context.id] = context
        self._event("context", "fake", "a lease needs it", context.id, None, None, "starting")
        return context

    def _join(self, context: ContextInfo, holder: Mapping[str, Any], ttl_s: float) -> LeaseInfo:
        now = self._now()
        starting = context.state is ContextState.STARTING
        if context.state is ContextState.IDLE:
            self._set_context(
                context,
                "client",
                "a lease joined",
                state=ContextState.RUNNING,
                idle_since=None,
                stops_at=None,
            )
        context = self._context(context.id)
        self._contexts[context.id] = replace(
            context, refcount=context.refcount + 1, leases_total=context.leases_total + 1
        )
        lease = LeaseInfo(
            id=self._id("lease"),
            profile=context.profile,
            context_id=context.id,
            state=LeaseState.PENDING if starting else LeaseState.ACTIVE,
            ttl_s=ttl_s,
            expires_at=now + timedelta(seconds=ttl_s),
            heartbeat_interval_s=round(ttl_s / 3, 3),
            holder=dict(holder),
            created_at=now,
            activated_at=None if starting else now,
            heartbeat_at=None,
            ended_at=None,
            end_reason=None,
        )
        self._leases[lease.id] = lease
        self._event("lease", "client", "leased", context.id, lease.id, None, lease.state.value)
        self._changed.notify_all()
        return lease

    def _boot(self, context_id: str) -> None:
        context = self._context(context_id)
        if context.state is not ContextState.STARTING or self.starts == "hold":
            return
        if self.starts == "fail":
            self.fail_context(context_id, "the fake was told to fail starts")
        else:
            self.start_context(context_id)

    def _end_live(self, lease_id: str, state: LeaseState, reason: str) -> LeaseInfo:
        lease = self._lease(lease_id)
        if lease.state.is_terminal:
            raise IllegalTransition(
                409, "illegal_transition", f"lease {lease_id} is {lease.state.value} already"
            )
        return self._end_lease(lease, state, reason, "fake")

    def _end_lease(self, lease: LeaseInfo, state: LeaseState, reason: str, actor: str) -> LeaseInfo:
        ended = self._set_lease(lease, actor, reason, state)
        for query in self._queries.values():
            if query.lease_id == lease.id and not query.state.is_terminal:
                self._cancel(query, f"its lease ended: {reason}")
        context = self._context(lease.context_id)
        refcount = context.refcount - 1
        self._contexts[context.id] = replace(context, refcount=refcount)
        if refcount == 0 and context.state is ContextState.RUNNING:
            grace = self._grace(context)
            now = self._now()
            self._set_context(
                self._context(context.id),
                actor,
                "its last lease ended",
                state=ContextState.IDLE,
                idle_since=now,
                stops_at=now + timedelta(seconds=grace),
            )
        return ended

    def _grace(self, context: ContextInfo) -> float:
        profile = self.profiles.get(context.profile)
        return profile.idle_grace_s if profile else 0.0

    def _set_lease(self, lease: LeaseInfo, actor: str, reason: str, state: LeaseState) -> LeaseInfo:
        now = self._now()
        changes: dict[str, Any] = {"state": state}
        if state is LeaseState.ACTIVE:
            changes["activated_at"] = now
        if state.is_terminal:
            changes.update(ended_at=now, end_reason=reason)
        updated = replace(lease, **changes)
        self._leases[lease.id] = updated
        self._event(
            "lease", actor, reason, lease.context_id, lease.id, lease.state.value, state.value
        )
        self._changed.notify_all()
        return updated

    def _set_context(self, context: ContextInfo, actor: str, reason: str, **changes: Any) -> None:
        updated = replace(context, **changes)
        self._contexts[context.id] = updated
        self._event(
            "context",
            actor,
            reason,
            context.id,
            None,
            context.state.value,
            updated.state.value,
        )
        self._changed.notify_all()

    def _stop(
        self,
        context: ContextInfo,
        state: ContextState,
        kind: StopKind,
        reason: str,
        actor: str = "fake",
    ) -> ContextInfo:
        now = self._now()
        self._set_context(
            context,
            actor,
            reason,
            state=state,
            stopped_at=now,
            stop_reason=reason,
            stop_kind=kind,
            idle_since=None,
            stops_at=None,
        )
        return self._costed(self._context(context.id))

    def _cancel(self, query: QueryInfo, reason: str) -> QueryInfo:
        return self._end_query(
            query, QueryState.CANCELLED, error=QueryErrorInfo("Cancelled", reason)
        )

    def _finish(self, query: QueryInfo, outcome: QueryOutcome) -> QueryInfo:
        if outcome.error_type is not None:
            return self._end_query(
                query,
                QueryState.FAILED,
                error=QueryErrorInfo(outcome.error_type, outcome.error_message),
            )
        rows = outcome.rows
        result_bytes = None
        output = query.destination
        if query.target == "collect":
            data, height = _ipc(outcome.result)
            self._extra.results[query.id] = data
            rows = height if rows is None else rows
            result_bytes = len(data)
            output = f"/v1/queries/{query.id}/result"
        return self._end_query(
            query, QueryState.SUCCEEDED, rows=rows, result_bytes=result_bytes, output=output
        )

    def _end_query(self, query: QueryInfo, state: QueryState, **changes: Any) -> QueryInfo:
        now = self._now()
        started = query.started_at or now
        ended = replace(
            query,
            state=state,
            started_at=started,
            finished_at=now,
            duration_s=round((now - started).total_seconds(), 6),
            **changes,
        )
        self._queries[query.id] = ended
        reason = ended.error.message if ended.error else state.value
        self._event(
            "query",
            "fake",
            reason,
            query.context_id,
            query.lease_id,
            query.state.value,
            state.value,
        )
        self._changed.notify_all()
        return ended

    def _event(
        self,
        kind: str,
        actor: str,
        reason: str,
        context_id: str | None,
        lease_id: str | None,
        from_state: str | None,
        to_state: str | None,
    ) -> None:
        self._events.append(
            EventInfo(
                id=len(self._events) + 1,
                at=self._now(),
                kind=kind,
                context_id=context_id,
                lease_id=lease_id,
                from_state=from_state,
                to_state=to_state,
                actor=actor,
                reason=reason,
            )
        )

    def _costed(self, context: ContextInfo) -> ContextInfo:
        up_s = max(0.0, ((context.stopped_at or self._now()) - context.created_at).total_seconds())
        return replace(context, cost_so_far=round(context.hourly_cost * up_s / 3600, 6))


def _ipc(result: Any) -> tuple[bytes, int | None]:
    """A collect's result as Arrow IPC bytes, and its height when known."""
    if isinstance(result, bytes):
        return result, None
    import polars as pl

    frame = pl.DataFrame() if result is None else result
    if not isinstance(frame, pl.DataFrame):
        raise TypeError(f"a query's result is a polars.DataFrame or IPC bytes, not {result!r}")
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return buffer.getvalue(), frame.height
