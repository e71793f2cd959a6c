"""The fake service's tables and the rules that change them: a lease joins a context with
room (made if the profile allows), ending a lease cancels its queries and may leave its
context idle, a stopped or failed context ends its leases; every change is an event and
wakes the long polls.

:class:`Records` is the base of :class:`~pclease_client.testing.service.FakeService`,
which adds what the routes call, the knobs and the inspection. Nothing here knows HTTP.
"""

from __future__ import annotations

import io
import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from pclease_client.errors import (
    ApiError,
    ContextNotFound,
    IllegalTransition,
    LeaseEnded,
    LeaseNotFound,
    QueryNotFound,
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

E = TypeVar("E", bound=ApiError)
#: The longest a long poll waits, as on the service.
LONG_POLL_MAX_S = 60.0
_JOINABLE = (ContextState.STARTING, ContextState.RUNNING, ContextState.IDLE)


def refusal(error: type[E], message: str) -> E:
    """``error`` with its class's status and code, as the service answers it."""
    return error(error.status, error.code, message)


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


class Records:
    """The leases, contexts, queries and events of the fake, under one lock (a condition
    that long polls wait on). Methods starting with ``_`` expect the lock held."""

    def __init__(
        self, profiles: Iterable[ProfileInfo], *, now: Callable[[], datetime] | None
    ) -> None:
        self.profiles: dict[str, ProfileInfo] = {p.name: p for p in profiles}
        self._now = now or (lambda: datetime.now(UTC))
        self._changed = threading.Condition(threading.RLock())
        self._closed = False
        self._ids = itertools.count(1)
        self._leases: dict[str, LeaseInfo] = {}
        self._contexts: dict[str, ContextInfo] = {}
        self._queries: dict[str, QueryInfo] = {}
        self._events: list[EventInfo] = []
        self._submitted: dict[str, SubmittedQuery] = {}
        self._results: dict[str, bytes] = {}

    def close(self) -> None:
        """End every long poll now (and any that comes later at once)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

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
            raise refusal(
                LeaseNotFound,
                f"no lease {lease_id!r}; list your leases with GET /v1/leases",
            )
        return lease

    def _context(self, context_id: str) -> ContextInfo:
        context = self._contexts.get(context_id)
        if context is None:
            raise refusal(
                ContextNotFound,
                f"no context {context_id!r}; list contexts with GET /v1/contexts",
            )
        return context

    def _query(self, query_id: str) -> QueryInfo:
        query = self._queries.get(query_id)
        if query is None:
            raise refusal(QueryNotFound, f"no query {query_id!r}")
        return query

    def _ended(self, lease: LeaseInfo) -> LeaseEnded:
        why = f" ({lease.end_reason})" if lease.end_reason else ""
        return refusal(
            LeaseEnded,
            f"lease {lease.id} has ended: it is {lease.state.value}{why}; request a new lease "
            "with POST /v1/leases",
        )

    def _live_leases(self, context_id: str) -> list[LeaseInfo]:
        return [
            x
            for x in self._leases.values()
            if x.context_id == context_id and not x.state.is_terminal
        ]

    def _room(
        self, shape: ProfileInfo, may_start: Callable[[int], None] | None = None
    ) -> ContextInfo | None:
        """A context of the profile a new lease may join, made if need be; None if full.
        ``may_start(live)`` raises when no context may be made (a quota), told how many
        of the profile live."""
        live = [
            c
            for c in self._contexts.values()
            if c.profile == shape.name and not c.state.is_terminal
        ]
        for context in live:
            if context.state in _JOINABLE and context.refcount < shape.max_leases_per_context:
                return context
        if may_start is not None:
            may_start(len(live))
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

    def _end_live(self, lease_id: str, state: LeaseState, reason: str) -> LeaseInfo:
        lease = self._lease(lease_id)
        if lease.state.is_terminal:
            raise refusal(IllegalTransition, f"lease {lease_id} is {lease.state.value} already")
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
            self._results[query.id] = data
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
            queue_position=None,
            queued_s=round((started - query.created_at).total_seconds(), 6),
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
