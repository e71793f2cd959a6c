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

``execute(handle, query) -> QueryOutcome``
    Run one query on the context and return when it has finished. The plan bytes are
    Polars' serialized plan exactly as the client sent them: deserialize them only where
    the query runs, never in the service process. Cancelling the awaiting task must stop
    the query (and leave the context usable). Failures of the *query* (Polars errors, a
    refused plan, a timeout) are returned as an outcome with ``error_type`` and
    ``error_message``; only failures of the *backend* raise
    :class:`~pclease_service.errors.BackendError`.

``close() -> None``
    Release clients and connections.

and declares what the service may rely on, instead of being probed:

``capabilities`` (a :class:`Capabilities`)
    ``stop_on_shutdown``: whether the service stops running contexts when it shuts down
    cleanly (true for local processes that would otherwise outlive it, false for remote
    compute that leases may still hold). ``list_is_cheap``: whether ``list()`` only reads
    local state, so that a readiness probe may call it (false for a remote API:
    ``/readyz`` then reports the reconciler's last sweeps instead).

``context_options(profile) -> Mapping``
    The profile's options this backend reads (``ContextSpec.options``); none by default.

``credentials`` (a :class:`Credentials` or None)
    The credentials it calls its provider with, so the service can report and reload them;
    None for backends that need none.

Backends never touch the database, and blocking SDK calls run in threads: the reconciler
adds its own timeouts around every call. A backend that must record a start *before*
making it (because what it starts cannot be labelled and read back) is handed a
:class:`StartLedger`: the service keeps it in the database, so every replica sees every
start.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from pclease_service.errors import BackendError
from pclease_service.plans.targets import QueryTarget

if TYPE_CHECKING:
    from pclease_service.config import Profile
    from pclease_service.credentials import CredentialStatus

LABEL_MANAGED_BY = "pclease.managed-by"
LABEL_INSTANCE = "pclease.instance"
LABEL_CONTEXT_ID = "pclease.context-id"
LABEL_PROFILE = "pclease.profile"
LABEL_QUERY_ID = "pclease.query-id"

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
    #: The fence of the claim under which this start is made (``contexts.fence``): a
    #: backend that records a start before making it (the Polars Cloud start ledger)
    #: stores it, so that a later claim of the same context can tell its own start from
    #: one a deposed replica made. 0 when no claim is involved (tests driving a backend).
    fence: int = 0


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


@dataclass(frozen=True)
class QuerySpec:
    """One query to run on a context."""

    query_id: str
    plan: bytes
    target: QueryTarget
    #: collect only: where to write the result as an Arrow IPC file.
    result_path: str | None = None
    engine: str = "auto"
    timeout_s: float = 3600.0
    #: collect only: refuse results larger than this (hint: sink instead).
    max_result_bytes: int = 1 << 30
    allow_python_udfs: bool = False
    #: Local directories (absolute) and object-store URI prefixes the plan may read and
    #: write. Anything else is refused before execution.
    data_roots: tuple[str, ...] = ()
    #: Paths that are refused even inside a data root (the service's own files).
    denied_paths: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class QueryOutcome:
    """How a query ended. ``error_type`` is Polars' exception class name (or one of
    pclease's: ``PlanRefused``, ``MemoryLimitExceeded``, ``QueryTimeout``,
    ``ResultTooLarge``, ``PlanVersionMismatch``, ...)."""

    ok: bool
    rows: int | None = None
    result_bytes: int | None = None
    output: str | None = None
    error_type: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class StartEntry:
    """A start a backend recorded before making it (see :class:`StartLedger`): where it
    asked, for what shape, when, and what it got (``compute_id``, None until the answer)."""

    context_id: str
    workspace_id: str
    compute_id: str | None
    requested_at: float
    cpus: int | None
    memory_gb: float | None
    cluster_size: int
    #: Until then (seconds since the epoch) the start request may still answer: nobody
    #: but its maker resolves it.
    answer_due_at: float = 0.0
    #: The fence of the claim the start was made under (``ContextSpec.fence``).
    fence: int = 0
    #: The replica that made it, for people.
    replica: str | None = None

    def handle(self) -> dict[str, Any]:
        """The backend handle of a completed entry."""
        return {"workspace_id": self.workspace_id, "compute_id": self.compute_id}


class StartLedger(Protocol):
    """Where a backend records its starts. Every method blocks (call it in a thread)."""

    def write(self, entry: StartEntry) -> None:
        """Insert or replace the entry of ``entry.context_id``."""
        ...

    def forget(self, entry: StartEntry) -> None:
        """Delete the entry of ``entry.context_id`` if it still records the same compute
        (or is still pending, for a pending ``entry``): a newer entry is kept."""
        ...

    def entries(self) -> list[StartEntry]:
        """Every entry, of every replica."""
        ...


@dataclass(frozen=True)
class Capabilities:
    """What the service may rely on a backend for (see the module docstring)."""

    stop_on_shutdown: bool = False
    list_is_cheap: bool = True


class Credentials(Protocol):
    """Credentials a backend holds for its provider (the Polars Cloud service account)."""

    def status(self) -> CredentialStatus:
        """The last known state; cheap, never blocks."""
        ...

    def check(self) -> CredentialStatus:
        """Make sure a token can be had now (blocking) and return the status."""
        ...

    def reload(self) -> None:
        """Read the credentials again now (blocking; raises CredentialsError)."""
        ...


class Backend(abc.ABC):
    kind: ClassVar[str]
    capabilities: ClassVar[Capabilities] = Capabilities()

    @property
    def credentials(self) -> Credentials | None:
        return None

    def context_options(self, profile: Profile) -> Mapping[str, Any]:
        return {}

    @abc.abstractmethod
    async def start(self, spec: ContextSpec) -> Handle: ...

    @abc.abstractmethod
    async def status(self, handle: Handle) -> Observation: ...

    @abc.abstractmethod
    async def stop(self, handle: Handle) -> None: ...

    @abc.abstractmethod
    async def list(self) -> list[Observed]: ...

    async def execute(self, handle: Handle, query: QuerySpec) -> QueryOutcome:
        raise BackendError(f"the {self.kind} backend cannot run queries")

    async def close(self) -> None:
        return None
