"""Classic operators: run one Polars query on a leased profile, and keep a profile warm
across a task group or a DAG run with setup/teardown tasks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from airflow.sdk import BaseOperator

from airflow_plugin import lineage
from airflow_plugin.deferring import (
    SHORT_WAIT_S,
    deadline,
    default_deferrable,
    lease_for_deferral,
    lease_from_event,
    release_quietly,
    settled,
    wait_briefly,
)
from airflow_plugin.hooks import PcleaseHook, PcleaseLeaseLostError, TaskLease, task_holder
from airflow_plugin.links import PcleaseLeaseLink, persist_lease_link
from airflow_plugin.triggers import PcleaseLeaseTrigger
from pclease_client import (
    Lease,
    LeaseLost,
    LeaseRef,
    LeaseState,
    QueryFailed,
    QueryInfo,
    QueryState,
    build_submission,
)

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
    _queries: list[QueryInfo]


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
            task._queries.extend(lease.queries)


class ReportsLineage:
    """``get_openlineage_facets_on_complete``: what the task's queries read and wrote, for
    the OpenLineage provider (when installed; see :mod:`airflow_plugin.lineage`)."""

    _queries: list[QueryInfo]

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        return lineage.openlineage_facets(self._queries)


class PcleaseOperator(ReportsLineage, SerializesConnId, BaseOperator):
    """Lease ``profile``, build a LazyFrame with ``build(*op_args, **op_kwargs)`` and run it
    on the leased context: sink it to ``target`` (``sink`` = parquet, csv, ipc or ndjson) or
    collect it (``sink="collect"``; the XCom then holds its row count and schema, not the
    rows). The lease is released when the task ends, however it ends.

    With ``deferrable`` the task gives its worker slot back while the context boots and
    while a query that does not end within a couple of seconds runs: it defers to
    :class:`~airflow_plugin.triggers.PcleaseLeaseTrigger`, which holds the lease in the
    triggerer, and resumes to finish (``build`` runs in the task, once the context runs).

    :param profile: the pclease compute profile, e.g. ``"small"`` (templated)
    :param build: returns the ``polars.LazyFrame`` to run; it runs in the task, only the
        plan goes to the context
    :param target: where the sink writes (templated)
    :param op_args: positional arguments for ``build`` (templated)
    :param op_kwargs: keyword arguments for ``build`` (templated)
    :param storage_options: object-store options for the sink
    :param ttl_s: the lease TTL (the service's default when None)
    :param start_timeout_s: how long to wait for a cold context to start
    :param deferrable: defer while the context boots and while the query runs (default:
        ``[pclease] default_deferrable``, else ``[operators] default_deferrable``)
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
        deferrable: bool | None = None,
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
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self._holding = _LeaseHolder()
        self._queries: list[QueryInfo] = []

    def _lazy_frame(self) -> pl.LazyFrame:
        import polars as pl

        lf = self.build(*self.op_args, **self.op_kwargs)
        if not isinstance(lf, pl.LazyFrame):
            raise TypeError(
                f"build returned {type(lf).__name__}; it must return a polars.LazyFrame"
            )
        return lf

    def execute(self, context: Any) -> dict[str, Any]:
        if self.deferrable:
            return self._execute_deferring(context)
        with task_lease(self, context) as lease:
            remote = lease.remote(self._lazy_frame(), engine=self.engine)  # type: ignore[arg-type]
            if self.sink == "collect":
                frame = remote.collect()
                self.log.info("collected %d rows:\n%s", frame.height, frame.head(10))
                return self._answer(lease.id, None, frame)
            sink = getattr(remote, f"sink_{self.sink}")
            query = sink(self.target, storage_options=self.storage_options)
            return self._answer(lease.id, query, None)

    def _answer(self, lease_id: str, query: QueryInfo | None, frame: Any) -> dict[str, Any]:
        """The XCom: for a collect, its row count and schema (not the rows)."""
        if frame is not None:
            return {
                "lease_id": lease_id,
                "rows": frame.height,
                "schema": {name: str(dtype) for name, dtype in frame.schema.items()},
            }
        assert query is not None
        return {
            "lease_id": lease_id,
            "query_id": query.id,
            "rows": query.rows,
            "target": self.target,
        }

    # -- deferrable: lease, defer while the context boots, submit, defer while it runs -------

    def _execute_deferring(self, context: Any) -> dict[str, Any]:
        with closing(PcleaseHook(self.pclease_conn_id)) as hook:
            info, ref = lease_for_deferral(hook, context, self.profile, ttl_s=self.ttl_s)
            info = wait_briefly(hook, info)
            if info.state is LeaseState.PENDING:
                self.log.info(
                    "context %s is starting: deferring until it runs (the worker slot is "
                    "free meanwhile)",
                    info.context_id,
                )
                self.defer(
                    trigger=PcleaseLeaseTrigger(
                        lease=ref.to_json(),
                        pclease_conn_id=self.pclease_conn_id,
                        deadline_at=deadline(self.start_timeout_s),
                        not_before=settled(),
                    ),
                    method_name="execute_running",
                )
            return self._submit(context, hook, ref)

    def execute_running(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resumed: the lease's context runs (or the lease is gone: the task fails)."""
        ref = lease_from_event(event, self.start_timeout_s)
        with closing(PcleaseHook(self.pclease_conn_id)) as hook:
            return self._submit(context, hook, ref)

    def _submit(self, context: Any, hook: PcleaseHook, ref: LeaseRef) -> dict[str, Any]:
        client = hook.get_conn()
        lease = client.resume(ref, on_progress=self.log.info)
        self._holding.hold(lease)
        try:
            try:
                lease.check()
            except LeaseLost as exc:
                raise PcleaseLeaseLostError.from_lost(exc) from exc
            submission = build_submission(
                self._lazy_frame(),
                self.sink,  # type: ignore[arg-type]
                self.target if self.sink != "collect" else None,
                storage_options=self.storage_options,
                engine=self.engine,  # type: ignore[arg-type]
                labels=ref.labels,
            )
            query = client.submit(lease.id, submission)
            self.log.info("query %s submitted on lease %s", query.id, lease.id)
            query = client.get_query(query.id, wait_s=SHORT_WAIT_S)
        except BaseException:
            lease.close("the task failed")
            raise
        finally:
            self._holding.hold(None)
        if not query.state.is_terminal:
            lease.handoff()
            self.log.info("query %s is %s: deferring until it ends", query.id, query.state.value)
            self.defer(
                trigger=PcleaseLeaseTrigger(
                    lease=ref.to_json(),
                    pclease_conn_id=self.pclease_conn_id,
                    query_id=query.id,
                    not_before=settled(),
                ),
                method_name="execute_complete",
            )
        lease.handoff()
        return self._finish(hook, ref, query)

    def execute_complete(self, context: Any, event: dict[str, Any] | None = None) -> dict[str, Any]:
        """Resumed: the query ended (or the lease did: the task fails)."""
        ref = lease_from_event(event, self.start_timeout_s)
        assert event is not None
        with closing(PcleaseHook(self.pclease_conn_id)) as hook:
            return self._finish(hook, ref, QueryInfo.from_json(event["query"]))

    def _finish(self, hook: PcleaseHook, ref: LeaseRef, query: QueryInfo) -> dict[str, Any]:
        """The query ended: release the lease, report lineage, answer or fail."""
        try:
            if query.state is not QueryState.SUCCEEDED:
                lease = hook.get_conn().get_lease(ref.lease_id)
                if query.state is QueryState.CANCELLED and lease.state.is_terminal:
                    raise PcleaseLeaseLostError.from_lost(LeaseLost.of(lease))
                failed = QueryFailed.of(query)
                raise failed.as_polars_error() from failed
            self.log.info(
                "query %s succeeded: %s rows in %s s", query.id, query.rows, query.duration_s
            )
            lineage.report(hook, query)
            self._queries.append(query)
            if self.sink != "collect":
                return self._answer(ref.lease_id, query, None)
            frame = hook.get_conn().result_frame(query.id)
            self.log.info("collected %d rows:\n%s", frame.height, frame.head(10))
            return self._answer(ref.lease_id, None, frame)
        finally:
            release_quietly(hook, ref.lease_id)

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
    whatever is left of the boot. With ``deferrable`` (and ``wait_for_context``) it waits
    for the context in the triggerer, its worker slot free meanwhile.
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
        deferrable: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.profile = profile
        self.ttl_s = ttl_s
        self.start_timeout_s = start_timeout_s
        self.wait_for_context = wait_for_context
        self.pclease_conn_id = pclease_conn_id
        self.deferrable = default_deferrable() if deferrable is None else deferrable
        self._holding = _LeaseHolder()

    def execute(self, context: Any) -> str:
        if self.deferrable and self.wait_for_context:
            return self._execute_deferring(context)
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

    def _execute_deferring(self, context: Any) -> str:
        with closing(PcleaseHook(self.pclease_conn_id)) as hook:
            info, ref = lease_for_deferral(
                hook, context, self.profile, ttl_s=self.ttl_s, holder={"purpose": "warm"}
            )
            info = wait_briefly(hook, info)
        if info.state.is_terminal:
            raise PcleaseLeaseLostError.from_lost(LeaseLost.of(info))
        if info.state is LeaseState.PENDING:
            self.log.info("context %s is starting: deferring until it runs", info.context_id)
            self.defer(
                trigger=PcleaseLeaseTrigger(
                    lease=ref.to_json(),
                    pclease_conn_id=self.pclease_conn_id,
                    deadline_at=deadline(self.start_timeout_s),
                    not_before=settled(),
                ),
                method_name="execute_running",
            )
        return self._warm(ref.lease_id, info.context_id)

    def execute_running(self, context: Any, event: dict[str, Any] | None = None) -> str:
        """Resumed: the context runs (or the lease is gone: the task fails)."""
        ref = lease_from_event(event, self.start_timeout_s)
        return self._warm(ref.lease_id, "")

    def _warm(self, lease_id: str, context_id: str) -> str:
        self.log.info(
            "profile %r is warm: lease %s holds context %s for up to %g s",
            self.profile,
            lease_id,
            context_id or "(its context)",
            self.ttl_s,
        )
        return lease_id

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
    deferrable: bool | None = None,
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
        deferrable=deferrable,
    )
    teardown = PcleaseReleaseLeaseOperator(
        task_id=f"{name}_release",
        lease_id=setup.output,
        pclease_conn_id=pclease_conn_id,
    )
    return setup, teardown
