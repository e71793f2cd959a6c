"""Tables of the service database (SQLAlchemy Core).

The Alembic migrations in ``migrations/`` create exactly this schema; a test compares them.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)

from pclease_service.text import readable

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python, naive UTC in the database (same on every dialect)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("pclease stores aware datetimes only")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


class ClientJSON(TypeDecorator[Any]):
    """A JSON document a client sent (a lease's holder, a query's labels), read back in a
    form that can always be answered with (:func:`service.text.readable`): a row stored
    before the API refused lone surrogates, or written by hand, cannot break a listing, a
    page or ``/metrics``."""

    impl = JSON
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return readable(value)


ID = String(36)

profiles = Table(
    "profiles",
    metadata,
    Column("name", String(63), primary_key=True),
    # Bumped by every lease request on the profile: the UPDATE takes the row lock that
    # serialises context allocation per profile on PostgreSQL and SQLite alike.
    Column("lock_version", Integer, nullable=False, default=0),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", ID, primary_key=True),
    Column("name", String(100), nullable=False, unique=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("scopes", String(100), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime),
)

contexts = Table(
    "contexts",
    metadata,
    Column("id", ID, primary_key=True),
    Column("profile", String(63), ForeignKey("profiles.name"), nullable=False),
    Column("backend", String(32), nullable=False),
    Column("state", String(16), nullable=False),
    Column("refcount", Integer, nullable=False, default=0),
    Column("leases_total", Integer, nullable=False, default=0),
    Column("hourly_cost", Float, nullable=False, default=0.0),
    # The backend's JSON checkpoint, saved as soon as a start has launched, so that a
    # restarted service can poll or stop what the previous process began.
    Column("backend_handle", JSON),
    Column("status_message", Text),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("idle_since", UTCDateTime),
    Column("stopping_since", UTCDateTime),
    Column("stopped_at", UTCDateTime),
    Column("stop_reason", Text),
    # A StopKind: why it stopped, for metrics, the dashboard and the stop fence (the reason
    # beside it is for people and may be reworded).
    Column("stop_kind", String(16)),
    # One actor per context: the replica that claims it acts on it until the claim
    # expires; every write recording a backend side effect checks ``fence`` (bumped by
    # each new claim), so a deposed or paused replica can never overwrite a newer one.
    Column("fence", BigInteger, nullable=False, default=0, server_default="0"),
    Column("claimed_by", String(100)),
    Column("claim_expires_at", UTCDateTime),
    # Backends whose contexts live on one replica's machine (local workers): which one.
    Column("host_replica", String(100)),
    Index(None, "profile", "state"),
    Index(None, "state"),
)

leases = Table(
    "leases",
    metadata,
    Column("id", ID, primary_key=True),
    Column("profile", String(63), ForeignKey("profiles.name"), nullable=False),
    Column("context_id", ID, ForeignKey("contexts.id"), nullable=False),
    Column("token_id", ID, ForeignKey("tokens.id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("ttl_s", Float, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime),
    Column("created_at", UTCDateTime, nullable=False),
    Column("activated_at", UTCDateTime),
    Column("ended_at", UTCDateTime),
    Column("end_reason", Text),
    Column("holder", ClientJSON, nullable=False),
    Column("dag_id", String(250)),
    Column("run_id", String(250)),
    Column("task_id", String(250)),
    Column("idempotency_key", String(200)),
    Column("request_fingerprint", String(64)),
    UniqueConstraint("token_id", "idempotency_key"),
    Index(None, "context_id", "state"),
    Index(None, "state", "expires_at"),
    Index(None, "dag_id", "run_id"),
)

events = Table(
    "events",
    metadata,
    # BIGINT on PostgreSQL; SQLite only auto-increments a column declared INTEGER.
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("context_id", ID),
    Column("lease_id", ID),
    Column("query_id", ID),
    Column("from_state", String(16)),
    Column("to_state", String(16)),
    Column("actor", String(120), nullable=False),
    Column("reason", Text, nullable=False),
    Index(None, "context_id", "id"),
    Index(None, "lease_id", "id"),
)

queries = Table(
    "queries",
    metadata,
    Column("id", ID, primary_key=True),
    Column("lease_id", ID, ForeignKey("leases.id"), nullable=False),
    Column("context_id", ID, ForeignKey("contexts.id"), nullable=False),
    Column("token_id", ID, ForeignKey("tokens.id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("target", String(16), nullable=False),
    # Where a sink writes, as the client named it; never storage options or credentials.
    Column("destination", Text),
    Column("engine", String(16), nullable=False),
    Column("labels", ClientJSON, nullable=False),
    Column("client_polars_version", String(32), nullable=False),
    Column("plan_bytes", BigInteger, nullable=False),
    Column("timeout_s", Float, nullable=False),
    Column("cancel_requested", Integer, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime),
    Column("finished_at", UTCDateTime),
    Column("rows", BigInteger),
    Column("result_bytes", BigInteger),
    Column("output", Text),
    Column("error_type", String(100)),
    Column("error_message", Text),
    # The replica whose runner sends it (while it runs); a dead replica's are failed.
    Column("runner_replica", String(100)),
    Index(None, "lease_id", "state"),
    Index(None, "state"),
    Index(None, "context_id", "created_at"),
)

#: What the polars_cloud backend asked Polars Cloud to start, one row per context, written
#: *before* the start request (compute id still unknown) and completed when it answers, so
#: that any replica can tell which live computes are this deployment's and can resolve a
#: start whose answer was lost (``backends/polars_cloud/ledger.py``). No secrets.
cloud_starts = Table(
    "cloud_starts",
    metadata,
    Column("context_id", ID, primary_key=True),
    Column("workspace_id", String(64), nullable=False),
    Column("compute_id", String(64)),
    # Seconds since the epoch (compared with the request_time Polars Cloud reports).
    Column("requested_at", Float, nullable=False),
    # Until then the start request may still answer: nobody else claims a compute for it.
    Column("answer_due_at", Float, nullable=False),
    Column("cpus", Integer),
    Column("memory_gb", Float),
    Column("cluster_size", Integer, nullable=False),
    # Who made the start (the replica id) and under which fencing token, when known.
    Column("replica", String(100)),
    Column("fence", BigInteger),
    Index(None, "workspace_id"),
    Index(None, "compute_id"),
)

#: Query plans and results when ``storage.kind = "database"``: small blobs, by key.
blobs = Table(
    "blobs",
    metadata,
    Column("key", String(200), primary_key=True),
    Column("data", LargeBinary, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

#: Keys the replicas of a deployment share, generated once by whichever asks first (the
#: dashboard's session signing key, unless ``session_secret`` is set).
service_keys = Table(
    "service_keys",
    metadata,
    Column("name", String(63), primary_key=True),
    Column("value", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

replicas = Table(
    "replicas",
    metadata,
    Column("id", String(100), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    # A ReplicaState: serving, draining, stopped.
    Column("state", String(16), nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
)

# One row (id 1) once anyone asked: whether the service as a whole is being shut down
# (``pclease shutdown``), which is what makes replicas stop contexts and the workers they
# host; a replica's own SIGTERM never does.
fleet = Table(
    "fleet",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("shutdown_requested_at", UTCDateTime),
    Column("shutdown_requested_by", String(120)),
)

# A lease request waiting for capacity, on any replica; the smallest id of a profile is
# the oldest waiter, and only it may take freed capacity.
waiting_tickets = Table(
    "waiting_tickets",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("profile", String(63), ForeignKey("profiles.name"), nullable=False),
    Column("replica", String(100), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Index(None, "profile", "id"),
)
