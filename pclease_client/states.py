"""The states the service reports, as enums: compare against these, never against strings.

They mirror the service's own (``pclease_service.states``, which this package must not
import); a test holds the two sets of members equal. The lifecycles::

    context   starting ──▶ running ◀──▶ idle ──▶ stopping ──▶ stopped   (or failed)
    lease     pending ──▶ active ──▶ released | expired | revoked | failed
    query     queued ──▶ running ──▶ succeeded | failed | cancelled

A context that stops or fails says why as a :class:`StopKind`; its ``stop_reason`` beside it
is for people.
"""

from __future__ import annotations

from enum import StrEnum


class LeaseState(StrEnum):
    #: Its context is starting.
    PENDING = "pending"
    #: Its context runs: queries may be submitted.
    ACTIVE = "active"
    #: Its holder (or the listener, the watchdog, an admin) released it.
    RELEASED = "released"
    #: No heartbeat within its TTL.
    EXPIRED = "expired"
    #: An admin stopped its context.
    REVOKED = "revoked"
    #: Its context failed underneath it.
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self not in (LeaseState.PENDING, LeaseState.ACTIVE)


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


class QueryState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self not in (QueryState.QUEUED, QueryState.RUNNING)


class StopKind(StrEnum):
    """Why a context stopped (or is stopping, or failed)."""

    #: Its idle grace ran out with no lease on it.
    IDLE = "idle"
    #: It was idle after its profile's ``max_lifetime_s`` had passed.
    MAX_LIFETIME = "max_lifetime"
    #: Its profile is no longer configured.
    UNCONFIGURED = "unconfigured"
    #: An admin stopped it.
    FORCED = "forced"
    #: The service shut down.
    SHUTDOWN = "shutdown"
    #: The backend reported it failed, or it could not start.
    FAILED = "failed"
