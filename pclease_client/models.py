"""What the service answers, as frozen dataclasses read from its JSON.

Each model mirrors one of the service's response bodies (``docs/api.md``; a test holds
the field names equal): :class:`LeaseInfo`, :class:`ContextInfo`, :class:`QueryInfo`,
:class:`EventInfo`, :class:`ProfileInfo`. States are enums (:mod:`pclease_client.states`),
times are timezone-aware ``datetime``, mappings are read-only. Error answers become
exceptions instead (:mod:`pclease_client.errors`).

``Model.from_json`` reads a decoded JSON object and ignores fields it does not know (a
newer service may add some); a missing field or a value of the wrong type raises
``ValueError`` naming it. ``to_json`` writes the service's shape back (the fake service
in :mod:`pclease_client.testing` answers with it). Neither does any I/O, so a synchronous
and an asynchronous client read answers the same way.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from datetime import datetime
from enum import Enum
from typing import Any, ClassVar, Self, TypeVar, Union, get_args, get_origin, get_type_hints

from pclease_client.states import ContextState, LeaseState, QueryState, StopKind

#: A holder value: what the service accepts (and so answers) for a holder key.
HolderValue = str | int | float | bool


@dataclasses.dataclass(frozen=True)
class Model:
    """Base of the response models: reading and writing the service's JSON."""

    #: How a message names this kind of object ("lease", "context"...).
    noun: ClassVar[str] = "object"

    @classmethod
    def from_json(cls, data: object) -> Self:
        """Read a decoded JSON object; ``ValueError`` names what does not fit."""
        return _read_model(cls, data, cls.noun)

    def to_json(self) -> dict[str, Any]:
        """This object as the service writes it."""
        return {f.name: _write(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class LeaseInfo(Model):
    """A lease as the service sees it. Heartbeat every ``heartbeat_interval_s`` (a third
    of ``ttl_s``) to keep it past ``expires_at``."""

    noun: ClassVar[str] = "lease"

    id: str
    profile: str
    context_id: str
    state: LeaseState
    ttl_s: float
    expires_at: datetime
    heartbeat_interval_s: float
    holder: Mapping[str, HolderValue]
    created_at: datetime
    activated_at: datetime | None
    heartbeat_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None


@dataclasses.dataclass(frozen=True)
class ContextInfo(Model):
    """A compute context: how many leases hold it, when it will stop and why it did."""

    noun: ClassVar[str] = "context"

    id: str
    profile: str
    backend: str
    state: ContextState
    refcount: int
    leases_total: int
    created_at: datetime
    started_at: datetime | None
    idle_since: datetime | None
    #: When an idle context will stop (idle grace, max lifetime or a removed profile).
    stops_at: datetime | None
    stopping_since: datetime | None
    stopped_at: datetime | None
    stop_reason: str | None
    stop_kind: StopKind | None
    status_message: str | None
    hourly_cost: float
    cost_so_far: float


@dataclasses.dataclass(frozen=True)
class QueryErrorInfo(Model):
    """Why a query failed: ``type`` is Polars' exception class or one of pclease's."""

    noun: ClassVar[str] = "query error"

    type: str
    message: str


@dataclasses.dataclass(frozen=True)
class DistributedInfo(Model):
    """The settings a query runs with on Polars Cloud's distributed engine (those of
    ``polars_cloud``'s ``lf.remote(ctx).distributed(...)``)."""

    noun: ClassVar[str] = "distributed settings"

    min_workers: int | None
    max_workers: int | None
    shuffle_compression: str
    shuffle_format: str
    shuffle_compression_level: int | None
    equi_join_broadcast_limit: int
    partitions_per_worker: int | None
    single_worker_ops: str
    expression_lowering: bool | None


@dataclasses.dataclass(frozen=True)
class QueryInfo(Model):
    """A query run through a lease. ``output`` is the sink's location, or the result's URL
    for a collect. ``inputs`` and ``outputs`` are its lineage: the paths and URIs its plan
    scans and writes, as the service read them off the plan (a collect has no outputs)."""

    noun: ClassVar[str] = "query"

    id: str
    lease_id: str
    context_id: str
    state: QueryState
    target: str
    destination: str | None
    engine: str
    labels: Mapping[str, str]
    plan_bytes: int
    timeout_s: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    rows: int | None
    result_bytes: int | None
    output: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    error: QueryErrorInfo | None
    #: None: the query runs on one node.
    distributed: DistributedInfo | None
    #: While queued: 1 for the next query its context runs, 2 for the one after, ...
    queue_position: int | None
    #: From submission until it started (so far, while it waits).
    queued_s: float | None


@dataclasses.dataclass(frozen=True)
class EventInfo(Model):
    """One entry of the audit log: a transition, who made it and why."""

    noun: ClassVar[str] = "event"

    id: int
    at: datetime
    kind: str
    context_id: str | None
    lease_id: str | None
    from_state: str | None
    to_state: str | None
    actor: str
    reason: str


@dataclasses.dataclass(frozen=True)
class ProfileInfo(Model):
    """A configured compute profile: its shape and limits (never its backend options)."""

    noun: ClassVar[str] = "profile"

    name: str
    cpus: int | None
    memory_gb: float | None
    cluster_size: int
    instance_type: str | None
    storage_gb: int | None
    workspace: str | None
    labels: Mapping[str, str]
    idle_grace_s: float
    max_leases_per_context: int
    max_contexts: int
    max_lifetime_s: float | None
    hourly_cost: float
    #: Queries one context runs at once; more wait in its queue.
    concurrent_queries: int


def read_list(model: type[Model], key: str, data: object) -> list[Any]:
    """The models under ``key`` of a list answer (``{"leases": [...]}``)."""
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"expected a JSON object with a list {key!r}")
    return [model.from_json(item) for item in data[key]]


# -- reading ----------------------------------------------------------------------------


_HINTS: dict[type[Model], dict[str, Any]] = {}
M = TypeVar("M", bound=Model)


def _read_model(cls: type[M], data: object, where: str) -> M:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_kind(data)}")
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            raise ValueError(f"{where}: no field {f.name!r}")
        values[f.name] = _read(hints[f.name], data[f.name], f"{where}.{f.name}")
    return cls(**values)


def _read(tp: Any, value: object, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(tp) if arg is not type(None)]
        if value is None:
            if len(options) < len(get_args(tp)):
                return None
            raise ValueError(f"{where}: must not be null")
        if len(options) == 1:
            return _read(options[0], value, where)
        for option in options:  # a union of scalars (holder values)
            if _is(option, value):
                return value
        raise ValueError(f"{where}: expected one of {_names(options)}, got {_kind(value)}")
    if origin is tuple:
        (item_type, _) = get_args(tp)  # only tuple[X, ...] is used
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {_kind(value)}")
        return tuple(_read(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin in (Mapping, dict):
        key_type, value_type = get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a JSON object, got {_kind(value)}")
        return types.MappingProxyType(
            {
                _read(key_type, k, f"{where} key"): _read(value_type, v, f"{where}.{k}")
                for k, v in value.items()
            }
        )
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in tp)
            raise ValueError(f"{where}: {value!r} is not one of {allowed}") from None
    if tp is datetime:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected an ISO 8601 time, got {_kind(value)}")
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not an ISO 8601 time") from None
    if isinstance(tp, type) and issubclass(tp, Model):
        return _read_model(tp, value, where)
    if not _is(tp, value):
        raise ValueError(f"{where}: expected {_names([tp])}, got {_kind(value)}")
    return float(value) if tp is float else value  # type: ignore[arg-type]


def _is(tp: Any, value: object) -> bool:
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _names(types_: list[Any]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    return " or ".join(names.get(tp, getattr(tp, "__name__", str(tp))) for tp in types_)


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, int | float) else type(value).__name__
    )


# -- writing ----------------------------------------------------------------------------


def _write(value: object) -> Any:
    if isinstance(value, Model):
        return value.to_json()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {k: _write(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_write(v) for v in value]
    return value
