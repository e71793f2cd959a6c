"""Whether a query runs distributed, and with which settings: the one rule, applied once
at submission. The answer is stored on the query and is what its backend receives."""

from __future__ import annotations

from pydantic import ValidationError

from pclease_service.config import DistributedSettings, Profile
from pclease_service.errors import InvalidInput
from pclease_service.text import message_of

#: What a submission may say: nothing (the profile decides), false (one node), true (the
#: profile's distributed defaults) or settings (over those defaults).
Requested = bool | DistributedSettings | None


def resolve(
    requested: Requested,
    profile: Profile | None,
    *,
    backend: str,
    backend_distributes: bool,
    engine: str,
) -> DistributedSettings | None:
    """The settings the query runs with, or None for one node. Raises InvalidInput (422)
    for a distributed query that the backend or the profile cannot run."""
    if requested is None:
        if profile is None or not backend_distributes:
            return None
        if not profile.runs_distributed_by_default():
            return None
        requested = True
    if requested is False:
        return None
    if profile is None:
        raise InvalidInput(
            "the lease's profile is no longer configured, so it cannot run distributed "
            "queries; leave out distributed"
        )
    if not backend_distributes:
        raise InvalidInput(
            f"the {backend} backend runs every query on one node; leave out distributed "
            "(distributed queries need backend = 'polars_cloud')"
        )
    if profile.cluster_size == 1:
        raise InvalidInput(
            f"profile {profile.name!r} runs on one node (cluster_size = 1), so it cannot run "
            "distributed queries; leave out distributed or lease a profile with "
            "cluster_size > 1"
        )
    if engine == "in-memory":
        raise InvalidInput(
            "engine 'in-memory' cannot run distributed queries; use engine 'auto' or "
            "'streaming', or run the query on one node (distributed: false)"
        )
    defaults = profile.polars_cloud.distributed
    try:
        settings = defaults if requested is True else requested.over(defaults)
    except ValidationError as exc:
        problems = "; ".join(message_of(error) for error in exc.errors())
        raise InvalidInput(
            f"distributed: {problems} (with the profile's defaults: "
            f"{defaults.model_dump(exclude_defaults=True) or 'none'})"
        ) from None
    problem = settings.workers_problem(profile.cluster_size)
    if problem is not None:
        raise InvalidInput(f"distributed: {problem}")
    return settings
