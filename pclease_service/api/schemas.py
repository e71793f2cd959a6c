"""Request and response bodies of the v1 API (the contract clients rely on)."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    model_validator,
)

from pclease_service.config import Profile
from pclease_service.contexts.rules import planned_stop
from pclease_service.plans.targets import QueryTarget
from pclease_service.states import ContextState, LeaseState, QueryState, StopKind
from pclease_service.store.contexts import ContextRecord
from pclease_service.store.events import EventRecord
from pclease_service.store.leases import LeaseRecord
from pclease_service.store.queries import QueryRecord

_MAX_HOLDER_KEYS = 20


class Holder(BaseModel):
    """Who holds a lease. Airflow fills the first five; other clients may add scalar keys."""

    model_config = ConfigDict(extra="allow")

    dag_id: str | None = Field(None, max_length=250)
    run_id: str | None = Field(None, max_length=250)
    task_id: str | None = Field(None, max_length=250)
    try_number: int | None = Field(None, ge=0, strict=True)
    map_index: int | None = Field(None, ge=-1, strict=True)

    @model_validator(mode="after")
    def _small_and_flat(self) -> Self:
        extra = self.model_extra or {}
        if len(self.model_fields_set) + len(extra) > _MAX_HOLDER_KEYS:
            raise ValueError(f"holder may have at most {_MAX_HOLDER_KEYS} keys")
        for key, value in extra.items():
            if len(key) > 64:
                raise ValueError(f"holder key {key[:64]!r}... is longer than 64 characters")
            if "\x00" in key:
                raise ValueError(f"holder key {key!r} contains a NUL character; remove it")
            if not isinstance(value, str | int | float | bool) or value is None:
                raise ValueError(f"holder.{key} must be a string, number or boolean")
            if isinstance(value, str) and len(value) > 250:
                raise ValueError(f"holder.{key} is longer than 250 characters")
            # Neither JSON nor the database can keep these faithfully.
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"holder.{key} must be a finite number")
        for key, value in self.model_dump(exclude_none=True).items():  # extras included
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"holder.{key} contains a NUL character; remove it")
        return self


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(min_length=1, max_length=63, description="A configured profile name.")
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

    @classmethod
    def of(cls, p: Profile) -> ProfileOut:
        # Only the shape: backend-specific options (env vars, requirements) may hold secrets.
        return cls(**p.model_dump(exclude={"local", "polars_cloud"}))


class ProfileList(BaseModel):
    profiles: list[ProfileOut]


class QueryOptions(BaseModel):
    """The JSON part of a query submission (the plan bytes travel beside it)."""

    model_config = ConfigDict(extra="forbid")

    target: QueryTarget = Field(description="collect, or the sink format: parquet/csv/ipc/ndjson.")
    destination: str | None = Field(
        None,
        max_length=2048,
        description="The sink's path or URI as the client wrote it (informational).",
    )
    engine: Literal["auto", "streaming", "in-memory"] = "auto"
    streaming: StrictBool | None = Field(None, description="Legacy: true means engine=streaming.")
    distributed: StrictBool = False
    labels: dict[str, str] = Field(default_factory=dict, max_length=20)
    polars_version: str = Field(min_length=1, max_length=32)
    timeout_s: StrictFloat | StrictInt | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.target is QueryTarget.COLLECT and self.destination not in (None, ""):
            raise ValueError("a collect query has no destination; leave it out")
        if self.target is not QueryTarget.COLLECT and not self.destination:
            raise ValueError(f"a {self.target.value} sink needs its destination")
        if self.streaming and self.engine == "in-memory":
            raise ValueError("streaming=true contradicts engine='in-memory'")
        for key, value in self.labels.items():
            if len(key) > 64 or len(value) > 250 or "\x00" in key + value:
                raise ValueError("labels are up to 64-character keys and 250-character values")
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
    error: QueryError | None

    @classmethod
    def of(cls, q: QueryRecord) -> QueryOut:
        duration = None
        if q.started_at is not None and q.finished_at is not None:
            duration = round((q.finished_at - q.started_at).total_seconds(), 6)
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
            error=error,
        )


class QueryList(BaseModel):
    queries: list[QueryOut]
