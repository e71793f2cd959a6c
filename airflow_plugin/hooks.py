"""``PcleaseHook``: the Airflow side's one way to reach the pclease service.

The connection (type ``pclease``) holds the service's address and a pclease token. That
token can lease compute and run queries; it never reveals the Polars Cloud credentials,
which only the service holds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseHook

from airflow_plugin import UI_FIELD_BEHAVIOUR, lineage
from pclease_client import (
    ApiError,
    AsyncPcleaseClient,
    Lease,
    LeaseInfo,
    LeaseLost,
    LeaseState,
    PcleaseClient,
    PcleaseClientError,
    QueryInfo,
    RemoteQuery,
)
from pclease_client.plans import Engine

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

#: Holder keys filled from the running task instance.
HOLDER_KEYS = ("dag_id", "run_id", "task_id", "try_number", "map_index")


class PcleaseLeaseLostError(LeaseLost):
    """The task's lease ended underneath it (expired, revoked, or its context failed);
    the message says what to do about it."""

    @classmethod
    def from_lost(cls, lost: LeaseLost) -> PcleaseLeaseLostError:
        shown = lost.state.value if lost.state is not None else "ended"
        return cls(
            lost.lease_id,
            lost.state,
            lost.reason,
            message=(
                f"pclease lease {lost.lease_id} ended underneath this task ({shown}"
                + (f": {lost.reason}" if lost.reason else "")
                + "); no more work was submitted on it. If the task outlived the lease TTL "
                "without heartbeating, raise ttl_s; if an operator revoked it, see the "
                "pclease dashboard."
            ),
        )


@dataclass(frozen=True)
class ConnectionSettings:
    """What the hook reads off the Airflow connection (never the token)."""

    base_url: str
    dashboard_url: str
    verify: bool | str
    timeout_s: float


def settings_from_connection(
    conn: Any, extra: Mapping[str, Any] | None = None
) -> ConnectionSettings:
    """Read host, port, scheme and the extras of a ``pclease`` connection.

    Accepts a bare host (``pclease.internal``), a host with a scheme
    (``https://pclease.internal``), or the scheme in the connection's ``schema`` field.
    ``extra``: the connection's extras already read (on an event loop, where
    ``conn.extra_dejson`` must not be called).
    """
    host = (conn.host or "").strip()
    if not host:
        raise ValueError(
            f"connection {conn.conn_id!r} has no host: set it to the pclease service's "
            "address, e.g. 127.0.0.1 or https://pclease.example.com"
        )
    extra = (conn.extra_dejson if extra is None else extra) or {}
    scheme = (conn.schema or extra.get("scheme") or "").strip().lower()
    if "://" in host:
        scheme, host = host.split("://", 1)
    scheme = scheme or "http"
    if scheme not in ("http", "https"):
        raise ValueError(f"connection {conn.conn_id!r}: scheme must be http or https, not {scheme}")
    host = host.rstrip("/")
    base_url = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
    verify: bool | str = True
    if extra.get("ca_bundle"):
        verify = str(extra["ca_bundle"])
    elif "verify_tls" in extra:
        verify = _as_bool(extra["verify_tls"], "verify_tls", conn.conn_id)
    timeout_s = float(extra.get("timeout_s") or 30.0)
    if timeout_s <= 0:
        raise ValueError(f"connection {conn.conn_id!r}: timeout_s must be positive")
    dashboard_url = str(extra.get("dashboard_url") or base_url).rstrip("/")
    return ConnectionSettings(base_url, dashboard_url, verify, timeout_s)


def _as_bool(value: Any, key: str, conn_id: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"connection {conn_id!r}: extra {key} must be true or false, not {value!r}")


class PcleaseHook(BaseHook):
    """Lease Polars compute from pclease and run Polars queries through it.

    ::

        hook = PcleaseHook()
        with hook.lease("large") as lease:
            lease.remote(lf).sink_parquet("s3://bucket/out.parquet")
    """

    conn_name_attr = "pclease_conn_id"
    default_conn_name = "pclease_default"
    conn_type = "pclease"
    hook_name = "pclease"

    def __init__(
        self,
        pclease_conn_id: str = default_conn_name,
        *,
        connection: Any = None,
        retries: int = 4,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        """``connection`` is an already resolved connection, for callers outside a task
        (the listener, in the scheduler), where the Task SDK cannot look it up.
        ``retries`` and ``timeout_s`` (default: the connection's) shape every HTTP call."""
        super().__init__(**kwargs)
        self.pclease_conn_id = pclease_conn_id
        self._connection = connection
        self._retries = retries
        self._timeout_s = timeout_s
        self._client: PcleaseClient | None = None
        self._settings: ConnectionSettings | None = None

    @property
    def connection(self) -> Any:
        if self._connection is None:
            self._connection = self.get_connection(self.pclease_conn_id)
        return self._connection

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return UI_FIELD_BEHAVIOUR

    @property
    def settings(self) -> ConnectionSettings:
        if self._settings is None:
            self._settings = settings_from_connection(self.connection)
        return self._settings

    def get_conn(self) -> PcleaseClient:
        if self._client is None:
            conn = self.connection
            settings = self.settings
            if not conn.password:
                raise ValueError(
                    f"connection {self.pclease_conn_id!r} has no password: put a pclease "
                    "token there (make one with `pclease token create NAME --scope lease`)"
                )
            self._client = PcleaseClient(
                settings.base_url,
                conn.password,
                timeout_s=self._timeout_s or settings.timeout_s,
                verify=settings.verify,
                retries=self._retries,
            )
        return self._client

    async def get_async_conn(self) -> AsyncPcleaseClient:
        """A new :class:`~pclease_client.AsyncPcleaseClient` from the connection, resolved
        without blocking the event loop (for triggers; the caller closes it)."""
        from airflow.providers.common.compat.connection import (
            get_async_connection,
            get_async_extra_dejson,
        )

        conn = self._connection or await get_async_connection(self.pclease_conn_id, hook=self)
        settings = settings_from_connection(conn, await get_async_extra_dejson(conn))
        if not conn.password:
            raise ValueError(
                f"connection {self.pclease_conn_id!r} has no password: put a pclease "
                "token there (make one with `pclease token create NAME --scope lease`)"
            )
        # In a thread: building the client loads the TLS trust store, which blocks.
        return await asyncio.to_thread(
            AsyncPcleaseClient,
            settings.base_url,
            conn.password,
            timeout_s=self._timeout_s or settings.timeout_s,
            verify=settings.verify,
            retries=self._retries,
        )

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def test_connection(self) -> tuple[bool, str]:
        try:
            profiles = self.get_conn().list_profiles()
        except (PcleaseClientError, ValueError) as exc:
            return False, f"pclease at {self._address()}: {exc}"
        names = ", ".join(p.name for p in profiles) or "none"
        return True, f"connected to pclease at {self.settings.base_url}; profiles: {names}"

    def _address(self) -> str:
        try:
            return self.settings.base_url
        except ValueError:
            return f"connection {self.pclease_conn_id!r}"

    # -- leases ----------------------------------------------------------------------------

    def lease_url(self, lease_id: str) -> str:
        return f"{self.settings.dashboard_url}/ui/leases/{lease_id}"

    @contextmanager
    def lease(
        self,
        profile: str,
        *,
        ttl_s: float | None = None,
        wait_s: float | None = None,
        start_timeout_s: float = 900.0,
        holder: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
        on_created: Callable[[Lease], None] | None = None,
    ) -> Iterator[TaskLease]:
        """Lease ``profile`` for the running task; release on exit, whatever way it ends.

        Waits until the context runs (logging progress), heartbeats from a background thread
        at the interval the service advises, and fails the task with
        :class:`PcleaseLeaseLostError` when the lease ends underneath it. Every query is
        labelled with the task that ran it, and a failed query raises Polars' own error.
        ``on_created`` gets the lease as soon as it exists, before its context runs (for
        ``on_kill``).
        """
        who = {**task_holder(context), **dict(holder or {})}
        client = self.get_conn()
        self.log.info("leasing pclease profile %r for %s", profile, _describe(who))
        created = False

        def hold(lease: Lease) -> None:
            nonlocal created
            created = True
            if on_created is not None:
                on_created(lease)

        try:
            with client.lease(
                profile,
                holder=who,
                ttl_s=ttl_s,
                wait_s=wait_s,
                start_timeout_s=start_timeout_s,
                labels=holder_labels(who),
                polars_errors=True,
                on_progress=self.log.info,
                on_created=hold,
            ) as lease:
                lease.on_query = functools.partial(lineage.report, self)
                self.log.info("lease %s on the dashboard: %s", lease.id, self.lease_url(lease.id))
                try:
                    yield TaskLease(lease, self)
                except PcleaseLeaseLostError:
                    raise
                except LeaseLost as exc:
                    raise PcleaseLeaseLostError.from_lost(exc) from exc
                if lease.lost is not None:
                    raise PcleaseLeaseLostError.from_lost(lease.lost)
        except PcleaseLeaseLostError:
            raise
        except LeaseLost as exc:  # while waiting for the context to start
            raise PcleaseLeaseLostError.from_lost(exc) from exc
        except BaseException as exc:
            if not created and not isinstance(exc, ApiError):
                self._release_unborn(who)
            raise

    def _release_unborn(self, who: Mapping[str, Any]) -> None:
        """The lease request was interrupted (``execution_timeout``, a signal, a dropped
        connection) after it may have reached the service: the lease may exist although
        its id never arrived. Release the task instance's live leases by its holder, in one
        short attempt on a connection of its own, as ``on_kill`` does."""
        if not {"dag_id", "run_id", "task_id"} <= who.keys():
            return
        try:
            released = self.get_conn().release_holder_once(
                who["dag_id"], who["run_id"], task_id=who["task_id"], map_index=who.get("map_index")
            )
        except Exception as exc:  # the scheduler's listener releases it when the run ends
            self.log.warning("could not release an interrupted pclease lease request: %s", exc)
            return
        for info in released:
            self.log.info("released pclease lease %s, whose request was interrupted", info.id)

    def release(self, lease_id: str) -> LeaseInfo:
        """Release one lease (a lease that ended already is answered as it is)."""
        return self.get_conn().release(lease_id)

    def release_holder(
        self,
        dag_id: str,
        run_id: str,
        task_id: str | None = None,
        map_index: int | None = None,
        *,
        timeout_s: float | None = None,
    ) -> list[str]:
        """Release every live lease held by a DAG run (or one of its task instances);
        returns the ids released. ``timeout_s`` bounds each attempt."""
        released = self.get_conn().release_holder(
            dag_id,
            run_id,
            task_id=task_id,
            map_index=map_index if task_id is not None else None,
            timeout_s=timeout_s,
        )
        return [lease.id for lease in released]


class TaskLease:
    """A lease as a task sees it: ``lease.remote(lf)`` mirrors Polars Cloud's
    ``lf.remote(ctx)`` (``.sink_parquet(...)``, ``.collect()``...), logs query progress
    to the task log and raises Polars' own error when a query fails."""

    def __init__(self, lease: Lease, hook: PcleaseHook) -> None:
        self._lease = lease
        self._hook = hook

    @property
    def id(self) -> str:
        return self._lease.id

    @property
    def context_id(self) -> str:
        return self._lease.context_id

    @property
    def profile(self) -> str:
        return self._lease.profile

    @property
    def state(self) -> LeaseState:
        return self._lease.state

    @property
    def info(self) -> LeaseInfo:
        """The lease as last read from pclease."""
        return self._lease.info

    @property
    def url(self) -> str:
        return self._hook.lease_url(self.id)

    @property
    def queries(self) -> list[QueryInfo]:
        """The queries that succeeded on this lease so far (with their lineage)."""
        return list(self._lease.queries)

    def __repr__(self) -> str:
        return f"TaskLease(id={self.id!r}, profile={self.profile!r})"

    def release(self) -> None:
        """Release now (idempotent); later queries on it fail with a clear error."""
        self._lease.close()

    def remote(
        self,
        lf: pl.LazyFrame,
        *,
        engine: Engine = "auto",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> RemoteQuery:
        """Run ``lf`` on the leased context: ``.sink_parquet(uri)``, ``.sink_csv``,
        ``.sink_ipc``, ``.sink_ndjson`` or ``.collect()``. The task's labels go with it
        (``labels`` adds to them)."""
        return self._lease.remote(lf, engine=engine, labels=labels, timeout_s=timeout_s)


def task_holder(context: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The holder fields of the running task instance (empty outside a task)."""
    if context is None:
        try:
            from airflow.sdk import get_current_context

            context = get_current_context()
        except Exception:  # not inside a running task: no holder to fill
            return {}
    ti = context.get("ti") or context.get("task_instance")
    if ti is None:
        return {}
    holder: dict[str, Any] = {}
    for key in HOLDER_KEYS:
        value = getattr(ti, key, None)
        if value is not None:
            holder[key] = value
    return holder


def holder_labels(holder: Mapping[str, Any]) -> dict[str, str]:
    """Query labels naming the task: ``airflow.dag_id=etl`` and so on."""
    return {f"airflow.{key}": str(holder[key]) for key in HOLDER_KEYS if key in holder}


def _describe(holder: Mapping[str, Any]) -> str:
    if not holder:
        return "this process"
    return " ".join(f"{key}={holder[key]}" for key in HOLDER_KEYS if key in holder)
