"""Classic operators: run one Polars query on a leased profile, and keep a profile warm
across a task group or a DAG run with setup/teardown tasks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from airflow.sdk import BaseOperator

from airflow_plugin.hooks import PcleaseHook, TaskLease, task_holder
from airflow_plugin.links import PcleaseLeaseLink, persist_lease_link
from pclease_client import Lease

if TYPE_CHECKING:
    import polars as pl

SINKS = ("parquet", "csv", "ipc", "ndjson", "collect")


class _LeaseHolder:
    """The lease a running task holds, from the moment it exists, so that ``on_kill``
    (called from the SIGTERM handler on the main thread, or on ``execution_timeout``) can
    release it while ``execute`` is blocked, even while it waits for a cold context."""

    def __init__(self) -> None:
        # Reentrant: the signal handler runs on the thread that may be inside hold().
        self._lock = threading.RLock()
        self._lease: Lease | None = None

    def hold(self, lease: Lease | None) -> None:
        with self._lock:
            self._lease = lease

    def release(self, log: Any) -> None:
        with self._lock:
            lease, self._lease = self._lease, None
        if lease is not None:
            log.info("task killed: releasing pclease lease %s", lease.id)
            lease.release_now()


class SerializesConnId:
    """Keep ``pclease_conn_id`` in the serialized DAG, so that the listener in the
    scheduler releases a run's leases through the connection its tasks used."""

    @classmethod
    def get_serialized_fields(cls) -> frozenset[str]:
        return frozenset(super().get_serialized_fields()) | {"pclease_conn_id"}  # type: ignore[misc]


class LeasingTask(Protocol):
    """What a task that runs inside a lease has: the operator and ``@task.pclease``."""

    pclease_conn_id: str
    profile: str
    ttl_s: float | None
    start_timeout_s: float
    _holding: _LeaseHolder


@contextmanager
def task_lease(task: LeasingTask, context: Any) -> Iterator[TaskLease]:
    """The lease of one task run: held for ``on_kill`` from its creation, its dashboard
    link stored for the UI, released (before the hook's client closes) when the task ends."""
    with (
        closing(PcleaseHook(task.pclease_conn_id)) as hook,
        hook.lease(
            task.profile,
            ttl_s=task.ttl_s,
            start_timeout_s=task.start_timeout_s,
            context=context,
            on_created=task._holding.hold,
        ) as lease,
    ):
        try:
            persist_lease_link(context, lease.id, lease.url)
            yield lease
        finally:
            task._holding.hold(None)


class PcleaseOperator(SerializesConnId, BaseOperator):
    """Lease ``profile``, build a LazyFrame with ``build(*op_args, **op_kwargs)`` and run it
    on the leased context: sink it to ``target`` (``sink`` = parquet, csv, ipc or ndjson) or
    collect it (``sink="collect"``; the XCom then holds its row count and schema, not the
    rows). The lease is released when the task ends, however it ends.

    :param profile: the pclease compute profile, e.g. ``"small"`` (templated)
    :param build: returns the ``polars.LazyFrame`` to run; it runs in the task, only the
        plan goes to the context
    :param target: where the sink writes (templated)
    :param op_args: positional arguments for ``build`` (templated)
    :param op_kwargs: keyword arguments for ``build`` (templated)
    :param storage_options: object-store options for the sink
    :param ttl_s: the lease TTL (the service's default when None)
    """

    template_fields: Sequence[str] = ("profile", "target", "op_args", "op_kwargs")
    template_fields_renderers: ClassVar[dict[str, str]] = {"op_args": "py", "op_kwargs": "py"}
    operator_extra_links = (PcleaseLeaseLink(),)
    ui_color = "#d7e9f7"

    def __init__(
        self,
        *,
        profile: str,
        build: Callable[..., pl.LazyFrame],
        target: str | None = None,
        sink: str = "parquet",
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        storage_options: Mapping[str, str] | None = None,
        engine: str = "auto",
        pclease_conn_id: str = PcleaseHook.default_conn_name,
        ttl_s: float | None = None,
        start_timeout_s: float = 900.0,
        **kwargs: Any,
    ) -> None:
        # Checked first, so that a refused task is never added to its DAG.
        if sink not in SINKS:
            raise ValueError(f"sink must be one of {', '.join(SINKS)}, not {sink!r}")
        if sink != "collect" and not target:
            raise ValueError(f"sink={sink!r} needs a target (a path or object-store URI)")
        if not callable(build):
            raise TypeError("build must be a callable returning a polars.LazyFrame")
        super().__init__(**kwargs)
        self.profile = profile
        self.build = build
        self.target = target
        self.sink = sink
        self.op_args = list(op_args or [])
        self.op_kwargs = dict(op_kwargs or {})
        self.storage_options = dict(storage_options) if storage_options else None
        self.engine = engine
        self.pclease_conn_id = pclease_conn_id
        self.ttl_s = ttl_s
        self.start_timeout_s = start_timeout_s
        self._holding = _LeaseHolder()

    def execute(self, context: Any) -> dict[str, Any]:
        import polars as pl

        with task_lease(self, context) as lease:
            lf = self.build(*self.op_args, **self.op_kwargs)
            if not isinstance(lf, pl.LazyFrame):
                raise TypeError(
                    f"build returned {type(lf).__name__}; it must return a polars.LazyFrame"
                )
            remote = lease.remote(lf, engine=self.engine)  # type: ignore[arg-type]
            if self.sink == "collect":
                frame = remote.collect()
                self.log.info("collected %d rows:\n%s", frame.height, frame.head(10))
                return {
                    "lease_id": lease.id,
                    "rows": frame.height,
                    "schema": {name: str(dtype) for name, dtype in frame.schema.items()},
                }
            sink = getattr(remote, f"sink_{self.sink}")
            query = sink(self.target, storage_options=self.storage_options)
            return {
                "lease_id": lease.id,
                "query_id": query.id,
                "rows": query.rows,
                "target": self.target,
            }

    def on_kill(self) -> None:
        self._holding.release(self.log)


class PcleaseAcquireLeaseOperator(SerializesConnId, BaseOperator):
    """A setup task: lease ``profile`` for the rest of the DAG run, so that its context is
    started before the work needs it and stays warm between tasks. Pushes the lease id.

    The lease is not heartbeated after this task ends: ``ttl_s`` bounds how long it keeps the
    context warm. :class:`PcleaseReleaseLeaseOperator` as the teardown releases it, and the
    provider's listener releases it when the DAG run ends.

    With ``wait_for_context`` (the default) the task ends once the context runs, so a
    profile that cannot start fails here, clearly, before any work depends on it. Without,
    it ends as soon as the lease exists and the context boots in the background: the task
    frees its worker slot at once, and the first task that needs the context waits for
    whatever is left of the boot.
    """

    template_fields: Sequence[str] = ("profile",)
    operator_extra_links = (PcleaseLeaseLink(),)
    ui_color = "#d7e9f7"

    def __init__(
        self,
        *,
        profile: str,
        ttl_s: float = 3600.0,
        start_timeout_s: float = 900.0,
        wait_for_context: bool = True,
        pclease_conn_id: str = PcleaseHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.profile = profile
        self.ttl_s = ttl_s
        self.start_timeout_s = start_timeout_s
        self.wait_for_context = wait_for_context
        self.pclease_conn_id = pclease_conn_id
        self._holding = _LeaseHolder()

    def execute(self, context: Any) -> str:
        with closing(PcleaseHook(self.pclease_conn_id)) as hook:
            client = hook.get_conn()
            holder = {**task_holder(context), "purpose": "warm"}
            info = client.create_lease(self.profile, holder=holder, ttl_s=self.ttl_s)
            lease = client.hold(info, on_progress=self.log.info)
            self._holding.hold(lease)
            try:
                persist_lease_link(context, lease.id, hook.lease_url(lease.id))
                if not self.wait_for_context:
                    self.log.info(
                        "lease %s holds context %s (%s); not waiting for it to run",
                        lease.id,
                        lease.context_id,
                        lease.state.value,
                    )
                    return lease.id
                lease.wait_active(self.start_timeout_s)
            except BaseException:
                lease.close()  # whatever stopped the wait, this warm lease has no user
                raise
            finally:
                self._holding.hold(None)
        self.log.info(
            "profile %r is warm: lease %s holds context %s for up to %g s",
            self.profile,
            lease.id,
            lease.context_id,
            self.ttl_s,
        )
        return lease.id

    def on_kill(self) -> None:
        self._holding.release(self.log)


class PcleaseReleaseLeaseOperator(SerializesConnId, BaseOperator):
    """A teardown task: release the lease a :class:`PcleaseAcquireLeaseOperator` took."""

    template_fields: Sequence[str] = ("lease_id",)
    ui_color = "#d7e9f7"

    def __init__(
        self,
        *,
        lease_id: Any,
        pclease_conn_id: str = PcleaseHook.default_conn_name,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lease_id = lease_id
        self.pclease_conn_id = pclease_conn_id

    def execute(self, context: Any) -> None:
        if not self.lease_id:
            self.log.info("no lease to release (its setup task took none)")
            return
        with closing(PcleaseHook(self.pclease_conn_id)) as hook:
            lease = hook.release(str(self.lease_id))
        self.log.info("released pclease lease %s (%s)", lease.id, lease.state.value)


def warm_profile(
    profile: str,
    *,
    task_id: str | None = None,
    ttl_s: float = 3600.0,
    wait_for_context: bool = True,
    pclease_conn_id: str = PcleaseHook.default_conn_name,
) -> tuple[PcleaseAcquireLeaseOperator, PcleaseReleaseLeaseOperator]:
    """A setup task leasing ``profile`` and the teardown releasing it, already paired::

        setup, teardown = warm_profile("large")
        with teardown.as_teardown(setups=setup):
            join = join_datasets()

    Tasks inside lease the same profile and so share the warm context; the teardown runs
    even when they fail.
    """
    name = task_id or f"pclease_warm_{profile}"
    setup = PcleaseAcquireLeaseOperator(
        task_id=name,
        profile=profile,
        ttl_s=ttl_s,
        wait_for_context=wait_for_context,
        pclease_conn_id=pclease_conn_id,
    )
    teardown = PcleaseReleaseLeaseOperator(
        task_id=f"{name}_release",
        lease_id=setup.output,
        pclease_conn_id=pclease_conn_id,
    )
    return setup, teardown
