"""The interface between the reconciler and whatever runs compute.

A backend must provide exactly these coroutine methods:

``start(spec) -> Handle``
    Launch a context for ``spec`` and return as soon as it is launched, *not* when it is
    ready. The handle is a JSON checkpoint that the service persists at once; every later
    call gets it back, possibly in another process after a restart. It must be enough to
    poll and to stop what was launched. Label what you launch with ``spec.labels`` so that
    :meth:`list` can identify it.

``status(handle) -> Observation``
    Where the launched context is now. Must not raise for a context that has gone away:
    report ``STOPPED`` or ``FAILED`` with a message instead.

``stop(handle) -> None``
    Stop it. Idempotent: stopping a stopped or vanished context succeeds.

``list() -> list[Observed]``
    Every context this backend can see that carries this deployment's labels, so the
    reconciler can adopt the ones the database lost track of and stop the ones it does not
    know.

``close() -> None``
    Release clients and connections. ``stop_on_shutdown`` says whether the service should
    stop running contexts when it shuts down cleanly (true for local processes that would
    otherwise outlive it, false for remote compute that leases may still hold).

Backends never touch the database, and blocking SDK calls run in threads: the reconciler
adds its own timeouts around every call.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

LABEL_MANAGED_BY = "pclease.managed-by"
LABEL_INSTANCE = "pclease.instance"
LABEL_CONTEXT_ID = "pclease.context-id"
LABEL_PROFILE = "pclease.profile"

Handle = Mapping[str, Any]


class Phase(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class ContextSpec:
    """What to start: the profile's shape plus identifying labels."""

    context_id: str
    profile: str
    cpus: int | None
    memory_gb: float | None
    cluster_size: int = 1
    instance_type: str | None = None
    storage_gb: int | None = None
    workspace: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Observation:
    phase: Phase
    message: str | None = None


@dataclass(frozen=True)
class Observed:
    """A context the backend can see, with the pclease context id from its labels."""

    handle: Handle
    phase: Phase
    context_id: str | None


class BackendError(Exception):
    """A backend call failed; the message is safe to show to users."""


class Backend(abc.ABC):
    kind: ClassVar[str]
    stop_on_shutdown: ClassVar[bool] = False

    @abc.abstractmethod
    async def start(self, spec: ContextSpec) -> Handle: ...

    @abc.abstractmethod
    async def status(self, handle: Handle) -> Observation: ...

    @abc.abstractmethod
    async def stop(self, handle: Handle) -> None: ...

    @abc.abstractmethod
    async def list(self) -> list[Observed]: ...

    async def close(self) -> None:
        return None
