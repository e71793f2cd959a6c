"""The two lifecycles pclease manages, as enums plus explicit transition tables.

Context::

    starting ──▶ running ◀──▶ idle
       │  ╲         │          │
       │   ╲        ▼          ▼
       │    ╲──▶ stopping ──▶ stopped
       ▼            │
     failed ◀───────┘   (any live state can fail)

Lease::

    pending ──▶ active ──▶ released | expired | revoked | failed
       └──────────────────▶ released | expired | revoked | failed

Query::

    queued ──▶ running ──▶ succeeded | failed | cancelled
       └─────────────────▶ failed | cancelled

A context that stops or fails keeps its :class:`StopKind` beside the reason: the reason is
for people, the kind is what metrics, the dashboard and the stop fence read.

A lease is ``pending`` while its context starts and ``active`` once it runs. ``failed``
means its context failed underneath it. The tables are the single source of truth: the
repository builds every guarded ``UPDATE ... WHERE state IN (...)`` from them.
"""

from __future__ import annotations

from enum import StrEnum


class ContextState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    IDLE = "idle"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (ContextState.STOPPED, ContextState.FAILED)


class StopKind(StrEnum):
    """Why a context stopped (or is stopping, or failed)."""

    #: Its idle grace ran out with no lease on it.
    IDLE = "idle"
    #: It was idle after its profile's ``max_lifetime_s`` had passed.
    MAX_LIFETIME = "max_lifetime"
    #: Its profile is no longer configured.
    UNCONFIGURED = "unconfigured"
    #: An admin stopped it (API or dashboard).
    FORCED = "forced"
    #: The service shut down and its backend's contexts must not outlive it.
    SHUTDOWN = "shutdown"
    #: The backend reported it failed, or it could not start.
    FAILED = "failed"


class LeaseState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    RELEASED = "released"
    EXPIRED = "expired"
    REVOKED = "revoked"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self not in (LeaseState.PENDING, LeaseState.ACTIVE)


CONTEXT_TRANSITIONS: dict[ContextState, frozenset[ContextState]] = {
    ContextState.STARTING: frozenset(
        {ContextState.RUNNING, ContextState.IDLE, ContextState.STOPPING, ContextState.FAILED}
    ),
    ContextState.RUNNING: frozenset(
        {ContextState.IDLE, ContextState.STOPPING, ContextState.FAILED}
    ),
    ContextState.IDLE: frozenset(
        {ContextState.RUNNING, ContextState.STOPPING, ContextState.FAILED}
    ),
    ContextState.STOPPING: frozenset({ContextState.STOPPED, ContextState.FAILED}),
    ContextState.STOPPED: frozenset(),
    ContextState.FAILED: frozenset(),
}

LEASE_TRANSITIONS: dict[LeaseState, frozenset[LeaseState]] = {
    LeaseState.PENDING: frozenset(
        {
            LeaseState.ACTIVE,
            LeaseState.RELEASED,
            LeaseState.EXPIRED,
            LeaseState.REVOKED,
            LeaseState.FAILED,
        }
    ),
    LeaseState.ACTIVE: frozenset(
        {LeaseState.RELEASED, LeaseState.EXPIRED, LeaseState.REVOKED, LeaseState.FAILED}
    ),
    LeaseState.RELEASED: frozenset(),
    LeaseState.EXPIRED: frozenset(),
    LeaseState.REVOKED: frozenset(),
    LeaseState.FAILED: frozenset(),
}


class QueryState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self not in (QueryState.QUEUED, QueryState.RUNNING)


QUERY_TRANSITIONS: dict[QueryState, frozenset[QueryState]] = {
    QueryState.QUEUED: frozenset({QueryState.RUNNING, QueryState.FAILED, QueryState.CANCELLED}),
    QueryState.RUNNING: frozenset({QueryState.SUCCEEDED, QueryState.FAILED, QueryState.CANCELLED}),
    QueryState.SUCCEEDED: frozenset(),
    QueryState.FAILED: frozenset(),
    QueryState.CANCELLED: frozenset(),
}

LIVE_QUERY_STATES = frozenset({QueryState.QUEUED, QueryState.RUNNING})

LIVE_CONTEXT_STATES = frozenset(s for s in ContextState if not s.is_terminal)
JOINABLE_CONTEXT_STATES = frozenset(
    {ContextState.STARTING, ContextState.RUNNING, ContextState.IDLE}
)
LIVE_LEASE_STATES = frozenset({LeaseState.PENDING, LeaseState.ACTIVE})


def context_sources(target: ContextState) -> frozenset[ContextState]:
    """The states a context may move to ``target`` from."""
    return frozenset(s for s, targets in CONTEXT_TRANSITIONS.items() if target in targets)


def query_sources(target: QueryState) -> frozenset[QueryState]:
    """The states a query may move to ``target`` from."""
    return frozenset(s for s, targets in QUERY_TRANSITIONS.items() if target in targets)


def lease_sources(target: LeaseState) -> frozenset[LeaseState]:
    """The states a lease may move to ``target`` from."""
    return frozenset(s for s, targets in LEASE_TRANSITIONS.items() if target in targets)


class ReplicaState(StrEnum):
    """A replica's row: ``serving`` while it takes requests, ``draining`` from its SIGTERM
    until it exits, ``stopped`` once it has (a replica that dies without saying so keeps
    its last state; its heartbeat going stale is what tells the others)."""

    SERVING = "serving"
    DRAINING = "draining"
    STOPPED = "stopped"
