"""Request and response bodies of the v1 API (the contract clients rely on)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    StrictBool,
    StrictFloat,
    StrictInt,
    Tag,
    TypeAdapter,
    WithJsonSchema,
    model_validator,
)

from pclease_service.config import DistributedSettings, Profile
from pclease_service.contexts.rules import planned_stop
from pclease_service.errors import QuotaName
from pclease_service.plans.targets import QueryTarget
from pclease_service.states import ContextState, LeaseState, QueryState, StopKind
from pclease_service.store.contexts import ContextRecord
from pclease_service.store.events import EventRecord
from pclease_service.store.leases import LeaseRecord
from pclease_service.store.queries import QueryRecord
from pclease_service.text import PATTERN, Text

_MAX_HOLDER_KEYS = 20

#: A holder's or a label's key, and a name or value that identifies something.
Key = Annotated[str, Text(64, min_length=1)]
Name = Annotated[str, Text(250)]
_NAME = TypeAdapter(Name)


def _holder_value(value: Any) -> Any:
    # bool is an int: both pass as they are.
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        # Neither JSON nor the database can keep these faithfully.
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value
    if isinstance(value, str):
        return _NAME.validate_python(value)
    raise ValueError("must be a string, number or boolean")


HolderValue = Annotated[
    Any,
    PlainValidator(_holder_value),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "maxLength": 250, "pattern": PATTERN},
                {"type": "number"},
                {"type": "boolean"},
            ]
        }
    ),
]


class Holder(BaseModel):
    """Who holds a lease. Airflow fills the first five; other clients may add scalar keys."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[Key, HolderValue]

    dag_id: Name | None = None
    run_id: Name | None = None
    task_id: Name | None = None
    try_number: int | None = Field(None, ge=0, strict=True)
    map_index: int | None = Field(None, ge=-1, strict=True)

    @model_validator(mode="after")
    def _small(self) -> Self:
        extra = self.model_extra or {}
        if len(self.model_fields_set) + len(extra) > _MAX_HOLDER_KEYS:
            raise ValueError(f"holder may have at most {_MAX_HOLDER_KEYS} keys")
        return self


class LeaseRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "profile": "small",
                    "holder": {
                        "dag_id": "nightly_etl",
                        "run_id": "scheduled__2026-11-23T00:00:00+00:00",
                        "task_id": "transform",
                        "try_number": 1,
                        "map_index": -1,
                    },
                    "ttl_s": 60,
                    "wait_s": 30,
                }
            ]
        },
    )

    profile: Annotated[str, Text(63, min_length=1)] = Field(
        description="A configured profile name (GET /v1/profiles lists them)."
    )
    holder: Holder = Field(default_factory=Holder)
    # strict: a number, not `true` or "30" quietly turned into one.
    ttl_s: float | None = Field(
        None,
        gt=0,
        strict=True,
        description="Seconds without a heartbeat before the lease expires.",
    )
    wait_s: float | None = Field(
        None,
        ge=0,
        strict=True,
        description="How long to wait for capacity before answering 429.",
    )


class LeaseOut(BaseModel):
    id: str
    profile: str
    context_id: str
    state: LeaseState
    ttl_s: float
    expires_at: datetime
    heartbeat_interval_s: float
    holder: dict[str, Any]
    created_at: datetime
    activated_at: datetime | None
    heartbeat_at: datetime | None
    ended_at: datetime | None
    end_reason: str | None

    @classmethod
    def of(cls, lease: LeaseRecord) -> LeaseOut:
        return cls(
            id=lease.id,
            profile=lease.profile,
            context_id=lease.context_id,
            state=lease.state,
            ttl_s=lease.ttl_s,
            expires_at=lease.expires_at,
            # A third of the TTL leaves room for two lost heartbeats.
            heartbeat_interval_s=round(lease.ttl_s / 3, 3),
            holder=dict(lease.holder),
            created_at=lease.created_at,
            activated_at=lease.activated_at,
            heartbeat_at=lease.heartbeat_at,
            ended_at=lease.ended_at,
            end_reason=lease.end_reason,
        )


class LeaseList(BaseModel):
    leases: list[LeaseOut]


class ContextOut(BaseModel):
    id: str
    profile: str
    backend: str
    state: ContextState
    refcount: int
    leases_total: int
    created_at: datetime
    started_at: datetime | None
    idle_since: datetime | None
    stops_at: datetime | None = Field(
        description="When an idle context will be stopped (its idle grace, its profile's "
        "max_lifetime_s, or at once if its profile is gone: whichever comes first)."
    )
    stopping_since: datetime | None
    stopped_at: datetime | None
    stop_reason: str | None
    stop_kind: StopKind | None = Field(
        description="Why it stopped, as a code: idle, max_lifetime, unconfigured, forced, "
        "shutdown, failed."
    )
    status_message: str | None
    hourly_cost: float
    cost_so_far: float = Field(description="hourly_cost times the time it has been up.")

    @classmethod
    def of(cls, c: ContextRecord, profile: Profile | None, now: datetime) -> ContextOut:
        planned = planned_stop(c, profile)
        end = c.stopped_at or now
        up_s = max(0.0, (end - c.created_at).total_seconds())
        return cls(
            id=c.id,
            profile=c.profile,
            backend=c.backend,
            state=c.state,
            refcount=c.refcount,
            leases_total=c.leases_total,
            created_at=c.created_at,
            started_at=c.started_at,
            idle_since=c.idle_since,
            stops_at=planned.at if planned else None,
            stopping_since=c.stopping_since,
            stopped_at=c.stopped_at,
            stop_reason=c.stop_reason,
            stop_kind=c.stop_kind,
            status_message=c.status_message,
            hourly_cost=c.hourly_cost,
            cost_so_far=round(c.hourly_cost * up_s / 3600, 6),
        )


class ContextList(BaseModel):
    contexts: list[ContextOut]


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str
    context_id: str | None
    lease_id: str | None
    from_state: str | None
    to_state: str | None
    actor: str
    reason: str

    @classmethod
    def of(cls, e: EventRecord) -> EventOut:
        return cls(**e.__dict__)


class EventList(BaseModel):
    events: list[EventOut]


class ProfileOut(BaseModel):
    name: str
    cpus: int | None
    memory_gb: float | None
    cluster_size: int
    instance_type: str | None
    storage_gb: int | None
    workspace: str | None
    labels: dict[str, str]
    idle_grace_s: float
    max_leases_per_context: int
    max_contexts: int
    max_lifetime_s: float | None
    hourly_cost: float
    concurrent_queries: int = Field(description="Queries one context runs at once.")

    @classmethod
    def of(cls, p: Profile) -> ProfileOut:
        # Only the shape: backend-specific options (env vars, requirements) may hold secrets.
        return cls(**p.model_dump(include=set(cls.model_fields)))


class ProfileList(BaseModel):
    profiles: list[ProfileOut]


class QuotaOut(BaseModel):
    """The limit that refused a request (``quota_exceeded``, ``budget_exhausted``)."""

    name: QuotaName
    profile: str | None = Field(
        description="The profile the limit is about; null for the token-wide ones."
    )
    used: float = Field(
        description="What the token uses now: leases, contexts, hours today or cost this "
        "month (in the unit of the profiles' hourly_cost)."
    )
    limit: float
    frees_at: datetime | None = Field(
        description="When the window restarts (next UTC day or month); null when it frees "
        "as the token's leases or contexts end (see Retry-After)."
    )


class ErrorBody(BaseModel):
    code: str = Field(
        description="Machine-readable and stable (service.errors lists them): branch on it.",
        examples=["lease_not_found"],
    )
    message: str = Field(description="For people: what went wrong and what to do next.")
    quota: QuotaOut | None = Field(
        None,
        description="Only on quota_exceeded (429) and budget_exhausted (403): the token's "
        "limit that refused the request. Nothing the token holds was touched.",
    )


class ErrorOut(BaseModel):
    """Every 4xx and 5xx answer of the API has this body."""

    error: ErrorBody


class Readiness(BaseModel):
    status: Literal["ok", "failing"]
    checks: dict[str, str] = Field(
        description="database, reconciler (this replica's loops), replica (draining or "
        "not): 'ok', or why not."
    )


class Health(BaseModel):
    status: Literal["ok"]
    checks: dict[str, str] = Field(
        description="credentials (if the backend has any), backend: 'ok', or why not. "
        "Shown, never failing the probe: readiness is /readyz."
    )


_ERRORS_WHEN = {
    400: "The body could not be read (not UTF-8, or not parseable at all).",
    401: "No bearer token, or an unknown or revoked one.",
    403: "The token's scope does not allow this, or the lease belongs to another token, or "
    "(budget_exhausted) the token spent its hard monthly budget on the profile.",
    404: "No such lease, context or query (or not visible to this token).",
    409: "The request conflicts with the current state (see the message).",
    410: "The lease has ended; request a new one.",
    413: "The body is larger than the service accepts.",
    422: "Invalid input; the message names each field and what is wrong with it.",
    429: "The profile is at capacity (capacity_exhausted), or the token is at one of its "
    "quotas (quota_exceeded, with the quota in the body); retry after Retry-After seconds.",
    503: "The service cannot do this now (backend credentials failing, or the database "
    "too busy); retry later.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route for these error statuses: each has :class:`ErrorOut`
    as its body, so the OpenAPI document describes the errors clients really get."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        responses[status] = {"model": ErrorOut, "description": _ERRORS_WHEN[status]}
        if status == 429:
            responses[status]["headers"] = {
                "Retry-After": {
                    "description": "Seconds until capacity or the quota is likely to free up.",
                    "schema": {"type": "integer"},
                }
            }
    return responses


def _distributed_kind(value: Any) -> str | None:
    if isinstance(value, bool):
        return "flag"
    if isinstance(value, dict | DistributedSettings):
        return "settings"
    return None


#: ``true``/``false`` or settings; the tags name the branch in error locations, where the
#: route drops them (``options.distributed.min_workers``).
DistributedOption = Annotated[
    Annotated[StrictBool, Tag("flag")] | Annotated[DistributedSettings, Tag("settings")],
    Discriminator(
        _distributed_kind,
        custom_error_type="distributed",
        custom_error_message="must be true, false or an object of distributed settings",
    ),
]
DISTRIBUTED_TAGS = ("flag", "settings")


class QueryOptions(BaseModel):
    """The JSON part of a query submission (the plan bytes travel beside it)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"target": "collect", "polars_version": "2.0.0", "labels": {"team": "data"}},
                {
                    "target": "parquet",
                    "destination": "s3://lake/daily/kpis.parquet",
                    "engine": "streaming",
                    "polars_version": "2.0.0",
                    "timeout_s": 900,
                },
            ]
        },
    )

    target: QueryTarget = Field(description="collect, or the sink format: parquet/csv/ipc/ndjson.")
    destination: Annotated[str, Text(2048)] | None = Field(
        None,
        description="The sink's path or URI, as the plan's sink writes it (422 otherwise).",
    )
    engine: Literal["auto", "streaming", "in-memory"] = "auto"
    streaming: StrictBool | None = Field(None, description="Legacy: true means engine=streaming.")
    distributed: DistributedOption | None = Field(
        None,
        description="Polars Cloud's distributed engine: true (with the profile's defaults), "
        "settings (over those defaults), false (one node); left out, the profile decides "
        "(distributed when its cluster_size > 1). 422 on a backend or profile that cannot.",
    )
    labels: dict[Key, Name] = Field(default_factory=dict, max_length=20)
    polars_version: Annotated[str, Text(32, min_length=1)] = Field(
        description="The client's Polars version; the plan must come from the same one."
    )
    timeout_s: StrictFloat | StrictInt | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.target is QueryTarget.COLLECT and self.destination not in (None, ""):
            raise ValueError("a collect query has no destination; leave it out")
        if self.target is not QueryTarget.COLLECT and not self.destination:
            raise ValueError(f"a {self.target.value} sink needs its destination")
        if self.streaming and self.engine == "in-memory":
            raise ValueError("streaming=true contradicts engine='in-memory'")
        return self


class QueryError(BaseModel):
    type: str
    message: str


class QueryOut(BaseModel):
    id: str
    lease_id: str
    context_id: str
    state: QueryState
    target: str
    destination: str | None
    engine: str
    labels: dict[str, str]
    plan_bytes: int
    timeout_s: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    rows: int | None
    result_bytes: int | None
    output: str | None = Field(description="Sink location, or the result URL of a collect.")
    inputs: list[str] = Field(
        description="Lineage: the paths and URIs the plan scans, as the client named them."
    )
    outputs: list[str] = Field(
        description="Lineage: the paths and URIs the plan writes (none for a collect)."
    )
    error: QueryError | None
    distributed: DistributedSettings | None = Field(
        description="The distributed settings it runs with; null: on one node."
    )
    queue_position: int | None = Field(
        description="While queued: 1 for the next query its context runs, 2 for the one "
        "after, ... (a context runs its profile's concurrent_queries at once)."
    )
    queued_s: float | None = Field(
        description="Time from submission until it started (so far, while it waits); "
        "duration_s counts from its start."
    )

    @classmethod
    def of(cls, q: QueryRecord, now: datetime | None = None) -> QueryOut:
        duration = None
        if q.started_at is not None and q.finished_at is not None:
            duration = round((q.finished_at - q.started_at).total_seconds(), 6)
        waited_until = q.started_at or q.finished_at or now
        queued = None
        if waited_until is not None:
            queued = round(max(0.0, (waited_until - q.created_at).total_seconds()), 6)
        error = None
        if q.error_type is not None:
            error = QueryError(type=q.error_type, message=q.error_message or "")
        return cls(
            id=q.id,
            lease_id=q.lease_id,
            context_id=q.context_id,
            state=q.state,
            target=q.target,
            destination=q.destination,
            engine=q.engine,
            labels=dict(q.labels),
            plan_bytes=q.plan_bytes,
            timeout_s=q.timeout_s,
            created_at=q.created_at,
            started_at=q.started_at,
            finished_at=q.finished_at,
            duration_s=duration,
            rows=q.rows,
            result_bytes=q.result_bytes,
            output=q.output,
            inputs=list(q.inputs),
            outputs=list(q.outputs),
            error=error,
            distributed=DistributedSettings.model_validate(q.distributed)
            if q.distributed is not None
            else None,
            queue_position=q.queue_position,
            queued_s=queued,
        )


class QueryList(BaseModel):
    queries: list[QueryOut]
