"""Every use of the polars-cloud client that is not its documented, public API.

Why this module exists: pclease forwards plan bytes that a client serialized elsewhere
and must never deserialize them, and it polls queries and contexts from a reconciler that
owns their lifecycle. The public API only runs a ``LazyFrame`` (which would mean
deserializing the plan here) and blocks while it waits, so the backend needs the
client's lower layer: ``polars_cloud.constants.API_CLIENT`` (the Rust ``ApiClient``),
``serialize_query_settings``, ``PyShuffleOpts``/``PyNumWorkers``, ``DistributionSettings``
and the private ``ComputeContext._compute_id``. These are undocumented and change between releases,
which is why ``polars-cloud`` is pinned and why nothing else in pclease imports
``polars_cloud``: a client upgrade is checked against this one file.

Facts this module relies on (observed with polars-cloud 0.12.0):

- The client reads ``POLARS_CLOUD_ACCESS_TOKEN`` from the environment on *every* call
  (so a refreshed token takes effect at once), and refuses an expired one locally with
  ``AuthLoadError`` before sending anything.
- ``POLARS_CLOUD_API_ADDR`` is read once per process, at the first call, and cannot be
  changed afterwards.
- Errors come back as ``ValueError`` whose text is the JSON error body; a 401 is rewritten
  to ``Status 401 Unauthorized ...``, and a gRPC UNAUTHENTICATED reads "The request does not
  have valid authentication credentials". 404 raises ``NotFoundError``. 429 is retried inside
  the client for about 10 s; nothing else is retried.

Everything here is blocking and runs in the client's own process
(:mod:`~pclease_service.backends.polars_cloud.host`), never in the service's: the client
is configured through environment variables, and that environment is the host's.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

TOKEN_ENV = "POLARS_CLOUD_ACCESS_TOKEN"  # noqa: S105 (a variable name)
API_ADDR_ENV = "POLARS_CLOUD_API_ADDR"
CONFIG_DIR_ENV = "POLARS_CLOUD_CONFIG_DIR"

# Polars Cloud's compute status names -> (live?, terminal?)
COMPUTE_LIVE = frozenset({"Starting", "Idle", "Running"})
QUERY_DONE = frozenset({"Success", "Failed", "Canceled"})

_env_lock = threading.Lock()


class CloudError(Exception):
    """A call to Polars Cloud failed. ``auth`` marks a refused token."""

    def __init__(self, message: str, *, auth: bool = False, not_found: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.auth = auth
        self.not_found = not_found


@dataclass(frozen=True)
class Compute:
    id: str
    workspace_id: str
    user_id: str
    status: str
    message: str | None
    request_time: float  # epoch seconds
    cpus: int | None
    ram_gb: int | None
    cluster_size: int
    #: The manifest it was started from (None for a compute started without one).
    name: str | None = None


@dataclass(frozen=True)
class Manifest:
    """A registered manifest (named compute context): what :mod:`.manifests` reads."""

    name: str
    live_cluster_id: str | None
    env: dict[str, str]


@dataclass(frozen=True)
class QueryStatus:
    status: str
    errors: tuple[str, ...]
    rows: int | None


@dataclass(frozen=True)
class QueryOutput:
    locations: tuple[str, ...]
    file_type: str | None
    rows: int | None
    errors: tuple[str, ...]


def use_token(token: str) -> None:
    """Make ``token`` the one the client sends (in the host process's environment). Only
    writes when it changed: glibc's ``setenv`` replaces an existing variable's pointer
    without freeing the old string, so a reader in a client thread sees either the old or
    the new token."""
    with _env_lock:
        if os.environ.get(TOKEN_ENV) != token:
            os.environ[TOKEN_ENV] = token


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return str(body["message"])[:500]
    return text[:500]


def translate(exc: BaseException) -> CloudError:
    """The client's exceptions as one type; never carries anything but the API's text."""
    import polars_cloud

    if isinstance(exc, CloudError):
        return exc
    if isinstance(exc, polars_cloud.polars_cloud.NotFoundError):
        return CloudError(f"not found: {_message(exc)}", not_found=True)
    if isinstance(exc, polars_cloud.polars_cloud.AuthLoadError):
        return CloudError(
            "no usable access token (" + _message(exc).split("\n")[0] + ")", auth=True
        )
    message = _message(exc)
    # REST 401s are rewritten by the client; gRPC UNAUTHENTICATED arrives as tonic's
    # description of the code.
    auth = any(
        marker in message
        for marker in (
            "401 Unauthorized",
            "Unauthenticated",
            "does not have valid authentication credentials",
        )
    )
    return CloudError(message or type(exc).__name__, auth=auth)


def _status_name(value: Any) -> str:
    name = getattr(value, "name", None)
    return str(name) if name else str(value).rsplit(".", 1)[-1]


class CloudClient:
    """The handful of Polars Cloud calls the backend makes (blocking)."""

    def __init__(self) -> None:
        import polars_cloud
        import polars_cloud.polars_cloud as pcr

        self._pc = polars_cloud
        self._pcr = pcr
        self._api = polars_cloud.constants.API_CLIENT
        self._workspaces: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- identity --------------------------------------------------------------------
    def user_id(self) -> str:
        return str(self._api.get_user().id)

    def workspace_id(self, name_or_id: str) -> str:
        with self._lock:
            cached = self._workspaces.get(name_or_id)
        if cached is not None:
            return cached
        try:
            found = str(UUID(name_or_id))
        except ValueError:
            matches = self._api.get_workspaces(name=name_or_id)
            named = [w for w in matches if w.name.lower() == name_or_id.lower()]
            if not named:
                raise CloudError(
                    f"no Polars Cloud workspace named {name_or_id!r} is visible to the "
                    "service account; check the profile's workspace or "
                    "polars_cloud.workspace",
                    not_found=True,
                ) from None
            found = str(named[0].id)
        with self._lock:
            self._workspaces[name_or_id] = found
        return found

    # -- computes --------------------------------------------------------------------
    def start(
        self,
        workspace_id: str,
        *,
        cpus: int | None,
        memory_gb: float | None,
        instance_type: str | None,
        storage_gb: int | None,
        cluster_size: int,
        requirements: list[str],
        env: dict[str, str],
        labels: list[str],
        idle_timeout_mins: int,
    ) -> str:
        """Launch a proxy-mode compute and return its id without waiting for it."""
        ctx = self._context(
            workspace_id,
            cpus=cpus,
            memory_gb=memory_gb,
            instance_type=instance_type,
            storage_gb=storage_gb,
            cluster_size=cluster_size,
            requirements=requirements,
            env=env,
            labels=labels,
            idle_timeout_mins=idle_timeout_mins,
        )
        ctx.start(wait=False)
        compute_id = ctx._compute_id  # private: the public API exposes no compute id
        if compute_id is None:
            raise CloudError("Polars Cloud accepted the start but returned no compute id")
        return str(compute_id)

    def _context(
        self,
        workspace_id: str,
        *,
        cpus: int | None,
        memory_gb: float | None,
        instance_type: str | None,
        storage_gb: int | None,
        cluster_size: int,
        requirements: list[str],
        env: dict[str, str],
        labels: list[str],
        idle_timeout_mins: int,
    ) -> Any:
        pc = self._pc
        return pc.ComputeContext(
            workspace=pc.Workspace(id=UUID(workspace_id)),
            cpus=cpus,
            memory=math.ceil(memory_gb) if memory_gb is not None else None,
            instance_type=instance_type,
            storage=storage_gb,
            cluster_size=cluster_size,
            requirements=("\n".join(requirements) + "\n").encode() if requirements else None,
            env_vars=dict(env),
            connection_mode="proxy",
            labels=labels,
            idle_timeout_mins=idle_timeout_mins,
        )

    # -- manifests (named compute contexts) ----------------------------------------------
    def register_manifest(
        self,
        workspace_id: str,
        name: str,
        *,
        cpus: int | None,
        memory_gb: float | None,
        instance_type: str | None,
        storage_gb: int | None,
        cluster_size: int,
        requirements: list[str],
        env: dict[str, str],
        labels: list[str],
        idle_timeout_mins: int,
    ) -> None:
        """Register (or re-register: the specs are replaced) the proxy-mode manifest
        ``name``; starts nothing."""
        ctx = self._context(
            workspace_id,
            cpus=cpus,
            memory_gb=memory_gb,
            instance_type=instance_type,
            storage_gb=storage_gb,
            cluster_size=cluster_size,
            requirements=requirements,
            env=env,
            labels=labels,
            idle_timeout_mins=idle_timeout_mins,
        )
        ctx.register(name)

    def find_manifest(self, workspace_id: str, name: str) -> Manifest:
        """The manifest ``name``; a CloudError with ``not_found`` if none is registered."""
        model = self._api.get_compute_cluster_manifest(UUID(workspace_id), name)
        live = model.live_cluster_id
        return Manifest(
            name=str(model.name),
            live_cluster_id=str(live) if live is not None else None,
            env=dict(model.env_vars or {}),
        )

    def start_manifest(self, workspace_id: str, name: str) -> Compute:
        """Start manifest ``name``: Polars Cloud answers its live cluster if it has one
        (at most one per manifest), else starts one. Does not wait for it."""
        return self._compute(self._api.start_compute_cluster_manifest(UUID(workspace_id), name))

    def _compute(self, model: Any) -> Compute:
        termination = getattr(model, "termination", None)
        message = getattr(termination, "termination_message", None) if termination else None
        reason = getattr(termination, "termination_reason", None) if termination else None
        if message is None and reason is not None:
            message = _status_name(reason)
        request_time = getattr(model, "request_time", None)
        return Compute(
            id=str(model.id),
            workspace_id=str(model.workspace_id),
            user_id=str(model.user_id),
            status=_status_name(model.status),
            message=message,
            request_time=request_time.timestamp() if request_time is not None else 0.0,
            cpus=model.req_cpu_cores,
            ram_gb=model.req_ram_gb,
            cluster_size=model.cluster_size,
            name=getattr(model, "name", None),
        )

    def get(self, workspace_id: str, compute_id: str) -> Compute:
        return self._compute(self._api.get_compute_cluster(UUID(workspace_id), UUID(compute_id)))

    def stop(self, workspace_id: str, compute_id: str) -> None:
        self._api.stop_compute_cluster(UUID(workspace_id), UUID(compute_id))

    def list(self, workspace_id: str) -> list[Compute]:
        status = [
            self._pcr.ComputeStatusModel.Starting,
            self._pcr.ComputeStatusModel.Idle,
            self._pcr.ComputeStatusModel.Running,
            self._pcr.ComputeStatusModel.Stopping,
        ]
        models = self._api.get_compute_clusters(UUID(workspace_id), status=status)
        return [self._compute(m) for m in models]

    # -- queries ---------------------------------------------------------------------
    def submit(
        self,
        compute_id: str,
        plan: bytes,
        engine: str,
        labels: Sequence[str] = (),
        distributed: Mapping[str, Any] | None = None,
    ) -> str:
        """Send the plan bytes as they are; ``labels`` show on the query in Polars Cloud.
        ``distributed`` (``DistributedSettings`` as a dict) runs it on the distributed
        engine, built as ``lf.remote(ctx).distributed(**distributed)`` builds it; None runs
        it on one node (``.single_node()``)."""
        pcr = self._pcr
        options = dict(distributed or {})
        shuffle = pcr.PyShuffleOpts.new(
            format=options.pop("shuffle_format", "auto"),
            compression=options.pop("shuffle_compression", "auto"),
            compression_level=options.pop("shuffle_compression_level", None),
        )
        workers = pcr.PyNumWorkers(
            min=options.pop("min_workers", None), max=options.pop("max_workers", None)
        )
        distribution = None
        if distributed is not None:
            from polars_cloud.query.query import DistributionSettings

            # The rest are DistributionSettings' own keywords (equi_join_broadcast_limit,
            # partitions_per_worker, single_worker_ops, expression_lowering).
            distribution = DistributionSettings(**options)
        settings = pcr.serialize_query_settings(
            engine=engine,
            plan_dot=False,
            shuffle_opts=shuffle,
            n_retries=0,
            n_workers=workers,
            distributed_settings=distribution,
            optimization_flags=None,
            flight_ttl=None,
            flight_maintain_order=None,
            priority=0,
            execute_until="execute",
        )
        query_id = self._api.submit_query(
            UUID(compute_id), plan, settings, list(labels) or None, None
        )
        return str(query_id)

    def query_status(self, workspace_id: str, query_id: str) -> QueryStatus:
        model = self._api.get_query(UUID(workspace_id), UUID(query_id))
        result = model.result
        return QueryStatus(
            status=_status_name(model.query.status_code),
            errors=tuple(result.errors) if result is not None else (),
            rows=result.n_rows_result if result is not None else None,
        )

    def query_output(self, query_id: str) -> QueryOutput:
        info = self._api.get_query_result(UUID(query_id))
        file_type = info.file_type_sink
        return QueryOutput(
            locations=tuple(info.sink_dst or ()),
            file_type=str(file_type).lower() if file_type is not None else None,
            rows=info.n_rows_result,
            errors=tuple(info.errors or ()),
        )

    def cancel(self, workspace_id: str, query_id: str) -> None:
        self._api.cancel_proxy_query(UUID(workspace_id), UUID(query_id))


def parse_query_errors(errors: tuple[str, ...]) -> tuple[str, str]:
    """(error type, message) from Polars Cloud's error strings (each a JSON object mapping
    ``scheduler`` or a worker id to ``"ErrorType: message"``); a worker's error wins, as in
    the client."""
    scheduler: str | None = None
    worker: str | None = None
    for raw in errors:
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"scheduler": raw}
        if not isinstance(payload, dict):
            payload = {"scheduler": str(payload)}
        for key, value in payload.items():
            if key == "scheduler":
                scheduler = scheduler or str(value)
            else:
                worker = worker or str(value)
    text = worker or scheduler
    if not text:
        return "ComputeError", "the query failed on Polars Cloud without an error message"
    kind, sep, rest = text.partition(":")
    if sep and kind.isidentifier():
        return kind, rest.strip()
    return "ComputeError", text
