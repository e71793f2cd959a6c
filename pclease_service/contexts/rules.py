"""When a context takes leases and when it stops: the one home of those rules.

An idle context (no lease on it) is stopped by the reconciler when the first of these
comes, and that moment is what the API and the dashboard show as its ``stops_at``:

- its profile's ``idle_grace_s`` has passed since it went idle (:attr:`StopKind.IDLE`);
- its profile's ``max_lifetime_s`` has passed since it was created
  (:attr:`StopKind.MAX_LIFETIME`); a context that old takes no new lease either, so it
  goes idle and stops once its last lease ends;
- its profile is no longer configured: at once (:attr:`StopKind.UNCONFIGURED`).

A context with leases on it is never stopped by these rules. The stop itself is fenced in
:func:`pclease_service.store.contexts.begin_idle_stop`: it applies only if the context is
still idle and empty, and idle since the moment the decision saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from pclease_service.config import Profile
from pclease_service.states import ContextState, StopKind
from pclease_service.store.contexts import ContextRecord


@dataclass(frozen=True)
class PlannedStop:
    """When and why an idle context will be stopped."""

    kind: StopKind
    at: datetime
    reason: str
    #: When the context went idle, as the decision saw it: the stop's fence.
    idle_since: datetime

    def due(self, now: datetime) -> bool:
        return now >= self.at


def planned_stop(context: ContextRecord, profile: Profile | None) -> PlannedStop | None:
    """When and why ``context`` will be stopped; None unless it is idle.

    ``profile`` is the context's profile as configured now (None: no longer configured).
    """
    idle_since = context.idle_since
    if context.state is not ContextState.IDLE or idle_since is None:
        return None
    if profile is None:
        reason = f"profile {context.profile!r} is no longer configured"
        return PlannedStop(StopKind.UNCONFIGURED, idle_since, reason, idle_since)
    at = idle_since + timedelta(seconds=profile.idle_grace_s)
    if profile.max_lifetime_s is not None:
        end_of_life = context.created_at + timedelta(seconds=profile.max_lifetime_s)
        if end_of_life <= at:
            reason = f"idle past its max_lifetime_s of {profile.max_lifetime_s:g}"
            return PlannedStop(StopKind.MAX_LIFETIME, end_of_life, reason, idle_since)
    reason = f"idle for its grace period of {profile.idle_grace_s:g} s"
    return PlannedStop(StopKind.IDLE, at, reason, idle_since)


def joinable_created_after(profile: Profile, now: datetime) -> datetime | None:
    """Only contexts created after this may take a new lease (None: any age)."""
    if profile.max_lifetime_s is None:
        return None
    return now - timedelta(seconds=profile.max_lifetime_s)
