"""Service configuration: one TOML file plus ``PCLEASE_*`` environment overrides.

Every duration carries its unit in its name (``lease_ttl_s``). Validators reject
combinations that cannot work, and :func:`load_settings` turns pydantic's errors into one
line per problem that names the key and what is allowed (:class:`ConfigError`).

Example::

    backend = "local"
    database_url = "postgresql+psycopg://pclease@db/pclease"

    [profiles.small]
    cpus = 2
    memory_gb = 4
    idle_grace_s = 120
    hourly_cost = 0.25
"""

from __future__ import annotations

import math
import os
import re
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_ENV_VAR = "PCLEASE_CONFIG"

#: The polars_cloud backend's retry plan (it reads these), from which its slowest call
#: follows: see :func:`polars_cloud_call_budget_s`.
POLARS_CLOUD_RETRY_DELAYS_S = (0.3, 1.0)
POLARS_CLOUD_START_ATTEMPTS = 3
_PROFILE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class BackendKind(StrEnum):
    LOCAL = "local"
    MEMORY = "memory"
    POLARS_CLOUD = "polars_cloud"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


class LocalProfileOptions(BaseModel):
    """Settings only the local backend reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    boot_delay_s: float = Field(0.0, ge=0, le=600, description="Simulated boot time.")


ShuffleCompression = Literal["auto", "uncompressed", "lz4", "zstd"]
ShuffleFormat = Literal["auto", "ipc", "parquet"]
SingleWorkerOps = Literal["auto", "allow", "forbid"]
ScalingMode = Literal["auto", "distributed", "single-node"]


class DistributedSettings(BaseModel):
    """How a distributed query runs on Polars Cloud: the options of polars-cloud's
    ``lf.remote(ctx).distributed(...)`` (0.12), with its defaults. A query's settings and a
    profile's defaults have this shape; the query's win field by field."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    min_workers: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Workers that must be available before the query starts (at most the "
        "profile's cluster_size).",
    )
    max_workers: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Most workers the query uses and is planned for (at most cluster_size).",
    )
    shuffle_compression: ShuffleCompression = "auto"
    shuffle_format: ShuffleFormat = "auto"
    shuffle_compression_level: int | None = Field(
        None, ge=1, le=22, description="zstd level; only with shuffle_compression = 'zstd'."
    )
    equi_join_broadcast_limit: int = Field(
        256 * 1024**2,
        ge=0,
        description="Largest side (bytes) an equi join may broadcast; 0 never broadcasts.",
    )
    partitions_per_worker: int | None = Field(None, ge=1, le=100_000)
    single_worker_ops: SingleWorkerOps = "auto"
    expression_lowering: bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (
            self.min_workers is not None
            and self.max_workers is not None
            and self.min_workers > self.max_workers
        ):
            raise ValueError(
                f"min_workers ({self.min_workers}) must not exceed max_workers ({self.max_workers})"
            )
        if self.shuffle_compression_level is not None and self.shuffle_compression != "zstd":
            raise ValueError(
                "shuffle_compression_level only applies to shuffle_compression = 'zstd'; "
                "set that too, or leave the level out"
            )
        return self

    def over(self, defaults: DistributedSettings) -> DistributedSettings:
        """These settings where they were given, ``defaults`` everywhere else."""
        given = self.model_dump(include=self.model_fields_set)
        return DistributedSettings.model_validate({**defaults.model_dump(), **given})

    def workers_problem(self, cluster_size: int) -> str | None:
        """Why these settings cannot run on ``cluster_size`` nodes, or None."""
        for name in ("min_workers", "max_workers"):
            value = getattr(self, name)
            if value is not None and value > cluster_size:
                return (
                    f"{name} = {value} is more than the profile's cluster_size of "
                    f"{cluster_size}; ask for at most {cluster_size} workers"
                )
        return None


class PolarsCloudProfileOptions(BaseModel):
    """Settings only the Polars Cloud backend reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requirements: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    idle_timeout_mins: int = Field(
        30, ge=10, description="Polars Cloud's own idle stop, kept as a backstop."
    )
    scaling_mode: ScalingMode = Field(
        "auto",
        description="How queries that do not say run: auto is distributed when cluster_size "
        "> 1 and single-node otherwise.",
    )
    distributed: DistributedSettings = Field(
        default_factory=DistributedSettings,
        description="Defaults for the distributed queries of this profile.",
    )


class Profile(BaseModel):
    """A named compute shape that leases ask for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    cpus: int | None = Field(None, ge=1, le=1024)
    memory_gb: float | None = Field(None, gt=0, le=16384)
    cluster_size: int = Field(1, ge=1, le=1000)
    instance_type: str | None = None
    storage_gb: int | None = Field(None, ge=1)
    workspace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    idle_grace_s: float = Field(300.0, ge=0, le=86400)
    max_leases_per_context: int = Field(64, ge=1, le=100_000)
    max_contexts: int = Field(1, ge=1, le=1000)
    max_lifetime_s: float | None = Field(None, gt=0)
    hourly_cost: float = Field(0.0, ge=0)
    data_roots: list[str] = Field(
        default_factory=list,
        description="Absolute directories and object-store URI prefixes (s3://bucket/prefix/) "
        "that queries on this profile may read and write.",
    )
    allow_python_udfs: bool = Field(
        False, description="Run plans that contain pickled Python functions (trusted users only)."
    )
    concurrent_queries: int = Field(
        1,
        ge=1,
        le=64,
        description="Queries one context runs at once; more wait in a queue per context, in "
        "submission order. Local backend: that many executor processes, each with an equal "
        "share of memory_gb.",
    )
    local: LocalProfileOptions = Field(default_factory=LocalProfileOptions)
    polars_cloud: PolarsCloudProfileOptions = Field(default_factory=PolarsCloudProfileOptions)

    @model_validator(mode="after")
    def _roots_are_absolute(self) -> Self:
        for root in self.data_roots:
            if "://" not in root and not root.startswith("/"):
                raise ValueError(
                    f"data_roots entry {root!r} must be an absolute path or a URI prefix "
                    "such as s3://bucket/prefix/"
                )
        return self

    @model_validator(mode="after")
    def _shape_is_given(self) -> Self:
        if self.instance_type is None and (self.cpus is None or self.memory_gb is None):
            raise ValueError("set both cpus and memory_gb, or an instance_type")
        return self

    @model_validator(mode="after")
    def _distribution_fits(self) -> Self:
        cloud = self.polars_cloud
        if self.cluster_size == 1 and cloud.scaling_mode == "distributed":
            raise ValueError(
                "polars_cloud.scaling_mode = 'distributed' needs cluster_size > 1 (a "
                "single-node context cannot run distributed queries)"
            )
        if self.cluster_size == 1 and cloud.distributed.model_fields_set:
            raise ValueError(
                "polars_cloud.distributed only applies to profiles with cluster_size > 1; "
                "remove it or raise cluster_size"
            )
        problem = cloud.distributed.workers_problem(self.cluster_size)
        if problem is not None:
            raise ValueError(f"polars_cloud.distributed: {problem}")
        return self

    def runs_distributed_by_default(self) -> bool:
        """Whether a query that does not say runs distributed on this profile."""
        mode = self.polars_cloud.scaling_mode
        return mode == "distributed" or (mode == "auto" and self.cluster_size > 1)


class ProfileQuota(BaseModel):
    """What one token may hold and spend on one profile."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_live_contexts: int | None = Field(
        None,
        ge=0,
        description="Live contexts of this profile the token's leases may have started. "
        "Joining a context that runs already never counts against it.",
    )
    monthly_budget: float | None = Field(
        None,
        gt=0,
        description="What the contexts the token started on this profile may cost per UTC "
        "calendar month: their up time times the profile's hourly_cost.",
    )
    monthly_budget_hard: bool = Field(
        True,
        description="true: once spent, refuse new contexts with 403 until the month ends; "
        "false: only report (metrics, dashboard, log).",
    )


class Quota(BaseModel):
    """What one token (one team) may hold and spend; an unset limit is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_live_leases: int | None = Field(
        None, ge=0, description="Pending and active leases at once, over all profiles."
    )
    max_instance_hours_per_day: float | None = Field(
        None,
        gt=0,
        description="Hours the contexts the token started were up in the current UTC day, "
        "over all profiles.",
    )
    profiles: dict[str, ProfileQuota] = Field(default_factory=dict)

    @property
    def unlimited(self) -> bool:
        return (
            self.max_live_leases is None
            and self.max_instance_hours_per_day is None
            and not self.profiles
        )


class QuotaSettings(BaseModel):
    """Per-token quotas, by token name (the name given to ``pclease token create``).

    A token with an entry in ``tokens`` uses that entry only; every other token uses
    ``default``. Re-read on ``SIGHUP``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: Quota = Field(default_factory=Quota)
    tokens: dict[str, Quota] = Field(default_factory=dict)

    def for_token(self, name: str) -> Quota:
        return self.tokens.get(name, self.default)

    def problems(self, profiles: dict[str, Profile]) -> list[str]:
        """What does not fit the configured ``profiles``, one line per problem."""
        problems: list[str] = []
        entries = [("quotas.default", self.default)] + [
            (f"quotas.tokens.{name}", quota) for name, quota in self.tokens.items()
        ]
        configured = ", ".join(sorted(profiles)) or "(none)"
        for where, quota in entries:
            for name, limits in quota.profiles.items():
                profile = profiles.get(name)
                if profile is None:
                    problems.append(
                        f"{where}.profiles.{name}: no profile {name!r} is configured "
                        f"(configured profiles: {configured})"
                    )
                elif limits.monthly_budget is not None and profile.hourly_cost == 0:
                    problems.append(
                        f"{where}.profiles.{name}.monthly_budget: profile {name!r} has "
                        "hourly_cost = 0, so it never spends anything: set "
                        f"profiles.{name}.hourly_cost, or remove the budget"
                    )
        return problems


class CredentialSourceKind(StrEnum):
    ENV = "env"
    FILE = "file"
    AWS_SECRETS_MANAGER = "aws_secrets_manager"


class CredentialsSettings(BaseModel):
    """Where the Polars Cloud service account (client id and secret) is read from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: CredentialSourceKind = CredentialSourceKind.ENV
    client_id_env: str = Field("POLARS_CLOUD_CLIENT_ID", min_length=1)
    client_secret_env: str = Field("POLARS_CLOUD_CLIENT_SECRET", min_length=1)
    client_id_file: Path | None = Field(
        None, description="Mounted secret files; surrounding whitespace is ignored."
    )
    client_secret_file: Path | None = None
    secret_id: str | None = Field(
        None,
        description="AWS Secrets Manager secret whose SecretString is JSON "
        '{"client_id": ..., "client_secret": ...}.',
    )
    aws_region: str | None = None
    aws_endpoint_url: str | None = None
    reread_interval_s: float = Field(
        300.0, gt=0, description="Re-read the source this often, so rotation needs no restart."
    )

    @model_validator(mode="after")
    def _source_is_complete(self) -> Self:
        if self.source is CredentialSourceKind.FILE and (
            self.client_id_file is None or self.client_secret_file is None
        ):
            raise ValueError(
                'source = "file" needs both client_id_file and client_secret_file '
                "(the paths of the mounted secret files)"
            )
        if self.source is CredentialSourceKind.AWS_SECRETS_MANAGER and not self.secret_id:
            raise ValueError(
                'source = "aws_secrets_manager" needs secret_id (the name or ARN of the '
                "secret holding client_id and client_secret)"
            )
        return self


class PolarsCloudSettings(BaseModel):
    """How the polars_cloud backend reaches Polars Cloud."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    credentials: CredentialsSettings = Field(default_factory=CredentialsSettings)
    token_url: str = Field(
        "https://auth.prd.cloud.pola.rs/realms/Polars/protocol/openid-connect/token",
        description="OAuth2 token endpoint for the client-credentials grant.",
    )
    token_refresh_margin_s: float = Field(
        60.0, ge=0, description="Refresh the access token this long before it expires."
    )
    api_addr: str | None = Field(None, description="Overrides POLARS_CLOUD_API_ADDR.")

    @field_validator("token_url", "api_addr")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    workspace: str | None = Field(None, description="For profiles that name no workspace.")
    request_timeout_s: float = Field(
        15.0,
        gt=0,
        description="Every single call to Polars Cloud is abandoned after this; a token "
        "fetch gets at most half of it.",
    )
    use_manifests: bool = Field(
        True,
        description="Start contexts through Polars Cloud manifests (named compute "
        "contexts, one per profile and slot): a repeated or lost start reconnects to the "
        "cluster it made instead of starting a second one. Off: plain starts and the start "
        "ledger.",
    )
    stop_unknown_computes: bool = Field(
        False,
        description="Stop live computes the service account started that this deployment "
        "has no record of (only with a service account of its own).",
    )


class StorageKind(StrEnum):
    LOCAL = "local"
    DATABASE = "database"
    S3 = "s3"


class StorageSettings(BaseModel):
    """Where query plans (until they run) and collect results (until ``result_ttl_s``
    after their lease ends) are kept. Every replica of a deployment must reach the same
    storage: ``local`` suits one replica, or replicas sharing one mounted directory."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: StorageKind = Field(
        StorageKind.LOCAL,
        description="local: a directory; database: the service database (small plans and "
        "results); s3: an S3-compatible bucket.",
    )
    directory: Path | None = Field(
        None, description="local: the directory (default: data_dir/spool)."
    )
    url: str | None = Field(
        None, description="s3: where to keep them, as s3://bucket/prefix/ (the prefix is optional)."
    )
    endpoint_url: str | None = Field(
        None, description="s3: an S3-compatible endpoint (MinIO, Ceph, ...) instead of AWS."
    )
    region: str | None = Field(None, description="s3: the bucket's region.")
    max_database_blob_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="database: plans and results larger than this are refused (they are "
        "held in memory and in one row); use s3 for larger ones.",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _complete(self) -> Self:
        if self.kind is StorageKind.S3:
            if not self.url or not re.match(
                r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$", self.url
            ):
                raise ValueError(
                    'storage.kind = "s3" needs url = "s3://bucket/prefix/" (a bucket name '
                    "of lowercase letters, digits, dots and dashes)"
                )
        elif self.url or self.endpoint_url or self.region:
            raise ValueError(
                f'storage.url, endpoint_url and region are for kind = "s3", not "{self.kind.value}"'
            )
        if self.kind is not StorageKind.LOCAL and self.directory is not None:
            raise ValueError(f'storage.directory is for kind = "local", not "{self.kind.value}"')
        if self.directory is not None and not self.directory.is_absolute():
            raise ValueError("storage.directory must be an absolute path")
        return self


def polars_cloud_call_budget_s(request_timeout_s: float) -> float:
    """The longest one polars_cloud backend call can take, so ``backend_call_timeout_s``
    never cancels it half-way. The slowest is a start: the workspace and user lookups
    (each retried), a wait for an earlier start of the same context and a listing, then up
    to ``POLARS_CLOUD_START_ATTEMPTS`` start requests, each failed one followed by a wait
    for concurrent starts and one listing, with pauses between."""
    retried = (len(POLARS_CLOUD_RETRY_DELAYS_S) + 1) * request_timeout_s + sum(
        POLARS_CLOUD_RETRY_DELAYS_S
    )
    attempts = POLARS_CLOUD_START_ATTEMPTS * 3 * request_timeout_s + sum(
        POLARS_CLOUD_RETRY_DELAYS_S[min(i, len(POLARS_CLOUD_RETRY_DELAYS_S) - 1)]
        for i in range(POLARS_CLOUD_START_ATTEMPTS - 1)
    )
    # Before all that, a start may wait for an earlier start of its context (another
    # replica's) to pass the time its request could still answer, and list once.
    earlier = 2 * request_timeout_s + 2.0
    # A few seconds for the ledger writes between the calls.
    return float(math.ceil(2 * retried + attempts + earlier + 5.0))


class Settings(BaseSettings):
    """Everything the service reads at startup."""

    model_config = SettingsConfigDict(
        env_prefix="PCLEASE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path(".pclease")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; defaults to a SQLite file in data_dir."
    )
    backend: BackendKind = BackendKind.LOCAL
    instance_name: str = Field(
        "pclease",
        pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
        description="Labels this deployment's contexts so two deployments never adopt "
        "or stop each other's.",
    )

    lease_ttl_s: float = Field(60.0, gt=0)
    lease_ttl_min_s: float = Field(5.0, gt=0)
    lease_ttl_max_s: float = Field(3600.0, gt=0)
    lease_wait_default_s: float = Field(30.0, ge=0)
    lease_wait_max_s: float = Field(300.0, ge=0)
    long_poll_max_s: float = Field(60.0, gt=0)
    reconcile_interval_s: float = Field(1.0, gt=0, le=60)
    orphan_sweep_interval_s: float = Field(30.0, gt=0)
    health_check_interval_s: float = Field(5.0, gt=0)
    start_timeout_s: float = Field(600.0, gt=0)
    stop_timeout_s: float = Field(120.0, gt=0)
    backend_call_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Every backend call is abandoned after this. With the polars_cloud "
        "backend it defaults to, and must be at least, what one call can take at worst.",
    )
    backend_unready_after_s: float = Field(
        120.0,
        gt=0,
        description="polars_cloud: /readyz fails once the backend could not be listed for "
        "this long (a single failed sweep only shows up in its JSON).",
    )
    token_cache_s: float = Field(5.0, ge=0, le=300)
    heartbeat_flush_s: float = Field(
        0.25,
        ge=0,
        le=5,
        description="Heartbeats on active leases are answered from memory and written in "
        "one batch this often; a crash loses at most this much of them (see "
        "docs/configuration.md). 0 writes every heartbeat before answering it.",
    )
    max_request_bytes: int = Field(65536, ge=1024)
    max_plan_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest query plan a client may submit."
    )
    query_timeout_s: float = Field(3600.0, gt=0, description="Default per-query timeout.")
    query_timeout_max_s: float = Field(6 * 3600.0, gt=0)
    max_result_bytes: int = Field(
        1024 * 1024 * 1024, ge=1, description="collect results larger than this are refused."
    )
    result_ttl_s: float = Field(
        900.0, gt=0, description="How long a collect result is kept after its lease ends."
    )

    replica_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="This process's name among the replicas sharing the database. Default: "
        "host name, process id and a random suffix (new for every process).",
    )
    replica_heartbeat_s: float = Field(
        2.0, gt=0, le=60, description="How often a replica refreshes its row in `replicas`."
    )
    replica_ttl_s: float = Field(
        15.0,
        gt=0,
        description="A replica silent this long is dead: its claims, running queries, "
        "waiting tickets and hosted contexts are taken over or failed by the others.",
    )
    drain_notice_s: float = Field(
        2.0,
        ge=0,
        le=60,
        description="On SIGTERM, how long a replica goes on answering (503 draining, "
        "/readyz failing) before it closes its port, so clients and load balancers move "
        "to the other replicas on an answer.",
    )
    drain_timeout_s: float = Field(
        60.0,
        ge=0,
        description="On SIGTERM, how long a replica waits for the queries it runs and its "
        "backend calls before it exits anyway.",
    )

    session_secret: SecretStr | None = Field(
        None,
        description="Signs dashboard session cookies (32+ characters). Default: a random key "
        "made once and kept in the database, shared by every replica; set it to keep the key "
        "out of the database.",
    )
    session_ttl_s: float = Field(8 * 3600.0, ge=60, le=30 * 86400)
    log_format: LogFormat = Field(
        LogFormat.TEXT, description="json: one JSON object a line, with lease and context ids."
    )

    storage: StorageSettings = Field(default_factory=StorageSettings)
    profiles: dict[str, Profile] = Field(default_factory=dict)
    quotas: QuotaSettings = Field(
        default_factory=QuotaSettings,
        description="Per-token limits and budgets (docs/quotas.md); re-read on SIGHUP.",
    )
    polars_cloud: PolarsCloudSettings = Field(default_factory=PolarsCloudSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_ENV_VAR)
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems: list[str] = []
        if not self.lease_ttl_min_s <= self.lease_ttl_s <= self.lease_ttl_max_s:
            problems.append(
                "lease_ttl_s must lie between lease_ttl_min_s and lease_ttl_max_s "
                f"(got {self.lease_ttl_min_s} <= {self.lease_ttl_s} <= {self.lease_ttl_max_s})"
            )
        if self.query_timeout_s > self.query_timeout_max_s:
            problems.append("query_timeout_s must not exceed query_timeout_max_s")
        beat_s = max(self.replica_heartbeat_s, self.reconcile_interval_s)
        if self.replica_ttl_s < 3 * beat_s:
            problems.append(
                "replica_ttl_s must be at least three times replica_heartbeat_s and "
                f"reconcile_interval_s (got {self.replica_ttl_s:g} < 3 x {beat_s:g}), or a "
                "replica that is merely slow is taken for dead"
            )
        if self.session_secret is not None and len(self.session_secret.get_secret_value()) < 32:
            problems.append(
                "session_secret must be at least 32 characters; make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
        if self.lease_wait_default_s > self.lease_wait_max_s:
            problems.append("lease_wait_default_s must not exceed lease_wait_max_s")
        if self.heartbeat_flush_s * 4 > self.lease_ttl_min_s:
            problems.append(
                "heartbeat_flush_s must be at most a quarter of lease_ttl_min_s, so that "
                "heartbeats lost in a crash leave their leases most of their TTL"
            )
        if self.reconcile_interval_s * 2 > self.lease_ttl_min_s:
            problems.append(
                "reconcile_interval_s must be at most half of lease_ttl_min_s, or leases "
                "could expire between two reconciler ticks unnoticed for too long"
            )
        for name, profile in self.profiles.items():
            if not _PROFILE_NAME.match(name):
                problems.append(
                    f"profiles.{name}: a profile name is 1-63 lowercase letters, digits, "
                    "'-' or '_', starting with a letter or digit"
                )
            if self.backend is not BackendKind.POLARS_CLOUD and (
                profile.cpus is None or profile.memory_gb is None
            ):
                problems.append(
                    f"profiles.{name}: the {self.backend.value} backend needs cpus and "
                    "memory_gb (instance_type alone only works with polars_cloud)"
                )
            problems += [f"profiles.{name}: {p}" for p in _unused_by(self.backend, profile)]
        problems.extend(self.quotas.problems(self.profiles))
        if problems:
            raise ValueError("; ".join(problems))
        named = {name: p.model_copy(update={"name": name}) for name, p in self.profiles.items()}
        object.__setattr__(self, "profiles", named)
        return self

    @model_validator(mode="after")
    def _polars_cloud_budget(self) -> Self:
        if self.backend is not BackendKind.POLARS_CLOUD:
            return self
        request_timeout_s = self.polars_cloud.request_timeout_s
        minimum = polars_cloud_call_budget_s(request_timeout_s)
        if "backend_call_timeout_s" not in self.model_fields_set:
            object.__setattr__(self, "backend_call_timeout_s", minimum)
        elif self.backend_call_timeout_s < minimum:
            raise ValueError(
                f"backend_call_timeout_s = {self.backend_call_timeout_s:g} is too short for "
                f"the polars_cloud backend with polars_cloud.request_timeout_s = "
                f"{request_timeout_s:g}: one start can take up to {minimum:g} s (lookups, "
                f"retried requests and listings of up to {request_timeout_s:g} s each). Set "
                f"backend_call_timeout_s to at least {minimum:g}, lower "
                "polars_cloud.request_timeout_s, or leave backend_call_timeout_s unset"
            )
        return self

    @model_validator(mode="after")
    def _polars_cloud_workspace(self) -> Self:
        if self.backend is not BackendKind.POLARS_CLOUD or self.polars_cloud.workspace:
            return self
        missing = [name for name, profile in self.profiles.items() if not profile.workspace]
        if missing:
            raise ValueError(
                f"the polars_cloud backend needs a workspace for profile(s) {', '.join(missing)}: "
                "set polars_cloud.workspace, or workspace in each of those profiles"
            )
        return self

    @property
    def lease_expiry_grace_s(self) -> float:
        """How long past its written deadline a lease may still have an acknowledged
        heartbeat on its way to the database (see ``heartbeat_flush_s``): expiry waits
        that long."""
        return 2 * self.heartbeat_flush_s

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'pclease.db').resolve()}"


def _unused_by(backend: BackendKind, profile: Profile) -> list[str]:
    """Profile settings ``backend`` would accept and then ignore: refused instead. (The
    memory backend runs nothing, so nothing is ignored more there than anywhere.)"""
    problems: list[str] = []
    if backend is BackendKind.LOCAL:
        if profile.cluster_size > 1:
            problems.append(
                "cluster_size > 1 needs backend = 'polars_cloud' (a local context is one "
                "worker process); use concurrent_queries to run queries side by side"
            )
        for key in ("instance_type", "storage_gb", "workspace"):
            if getattr(profile, key) is not None:
                problems.append(
                    f"{key} only applies to backend = 'polars_cloud'; the local backend "
                    "would ignore it, so remove it"
                )
        if profile.polars_cloud.model_fields_set:
            problems.append(
                "polars_cloud options only apply to backend = 'polars_cloud'; the local "
                "backend would ignore them, so remove them"
            )
    if backend is BackendKind.POLARS_CLOUD and profile.local.model_fields_set:
        problems.append(
            "local options only apply to backend = 'local'; Polars Cloud would ignore them, "
            "so remove them"
        )
    return problems


class ConfigError(Exception):
    """The configuration cannot be used; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _format_error(error: Any) -> list[str]:
    loc = ".".join(str(part) for part in error["loc"])
    message: str = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if error["type"] == "extra_forbidden":
        message = "unknown key; check its spelling against docs/configuration.md"
    if not loc:
        return [part.strip() for part in message.split("; ")]
    given = error.get("input")
    # Echo short scalar values only: a URL or a nested table may carry a password.
    if isinstance(given, int | float | str) and len(str(given)) <= 40 and "url" not in loc:
        return [f"{loc}: {message} (got {given!r})"]
    return [f"{loc}: {message}"]


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Read the TOML file (or ``$PCLEASE_CONFIG``) and the environment.

    Raises :class:`ConfigError` with one message per problem.
    """
    previous = os.environ.get(CONFIG_ENV_VAR)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"])
        os.environ[CONFIG_ENV_VAR] = str(path)
    elif previous and not Path(previous).is_file():
        raise ConfigError([f"{CONFIG_ENV_VAR}={previous} does not name a file"])
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems: list[str] = []
        for error in exc.errors():
            problems.extend(_format_error(error))
        raise ConfigError(problems) from None
    except ValueError as exc:  # a TOML syntax error
        raise ConfigError([f"cannot parse the config file: {exc}"]) from None
    finally:
        if config_file is not None:
            if previous is None:
                os.environ.pop(CONFIG_ENV_VAR, None)
            else:
                os.environ[CONFIG_ENV_VAR] = previous
