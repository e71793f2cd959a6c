"""Release leases the task process could not: a task instance that failed (or was marked
failed) and a DAG run that ended.

Listeners run inside Airflow's own loops (the DAG-run ones in the scheduler), so each call
here is one short request without retries, and errors are logged, never raised: Airflow
must not stall or fail because pclease is unreachable (the lease TTL still ends them).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from airflow.listeners import hookimpl

from airflow_plugin.hooks import PcleaseHook

log = logging.getLogger(__name__)

#: One attempt, and not for long: these run in the scheduler's loop.
_TIMEOUT_S = 3.0

#: Task types of this provider (a serialized DAG keeps the names, not the classes).
_OUR_TASK_TYPES = frozenset(
    {
        "PcleaseOperator",
        "PcleaseAcquireLeaseOperator",
        "PcleaseReleaseLeaseOperator",
        "_PcleaseDecoratedOperator",
    }
)


def _conn_id_of(task: Any) -> str:
    """The connection a task's leases came through: its operator's ``pclease_conn_id``, or
    the default one (a plain task may use ``PcleaseHook()`` itself)."""
    conn_id = getattr(task, "pclease_conn_id", None)
    return conn_id if isinstance(conn_id, str) else PcleaseHook.default_conn_name


def _is_ours(task: Any) -> bool:
    task_type = getattr(task, "task_type", None) or type(task).__name__
    return task_type in _OUR_TASK_TYPES


@contextmanager
def _hook(conn_id: str) -> Iterator[PcleaseHook | None]:
    """A quick hook that works in a task process and in the scheduler alike; None when the
    connection does not exist (this deployment does not use pclease through it)."""
    hook = PcleaseHook(conn_id, retries=0, timeout_s=_TIMEOUT_S)
    try:
        hook.connection  # noqa: B018 (resolve it now, to fall back if needed)
    except Exception as exc:
        # Outside a task the Task SDK has no route to the metastore's connections.
        log.debug("pclease: connection %r not found through the Task SDK: %s", conn_id, exc)
        try:
            from airflow.models.connection import Connection

            connection = Connection.get_connection_from_secrets(conn_id)
        except Exception:
            log.debug("pclease: no connection %r; nothing to release", conn_id)
            yield None
            return
        hook = PcleaseHook(conn_id, connection=connection, retries=0, timeout_s=_TIMEOUT_S)
    try:
        yield hook
    finally:
        hook.close()


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    """Any failed task: it may have leased through ``PcleaseHook`` in a plain task."""
    with _hook(_conn_id_of(getattr(task_instance, "task", None))) as hook:
        if hook is None:
            return
        try:
            released = hook.release_holder(
                task_instance.dag_id,
                task_instance.run_id,
                task_instance.task_id,
                getattr(task_instance, "map_index", None),
            )
        except Exception as exc:
            log.warning(
                "pclease: could not release the leases of failed %s: %s", task_instance, exc
            )
            return
    if released:
        log.info("pclease: released %s after task %s failed", ", ".join(released), task_instance)


def _release_run(dag_run: Any, how: str) -> None:
    """Only DAGs with a pclease task: this runs in the scheduler for every DAG run."""
    dag = getattr(dag_run, "dag", None)
    ours = [task for task in getattr(dag, "tasks", None) or [] if _is_ours(task)]
    for conn_id in sorted({_conn_id_of(task) for task in ours}):
        with _hook(conn_id) as hook:
            if hook is None:
                continue
            try:
                released = hook.release_holder(dag_run.dag_id, dag_run.run_id)
            except Exception as exc:
                log.warning("pclease: could not release the leases of run %s: %s", dag_run, exc)
                continue
        if released:
            log.info("pclease: released %s as run %s %s", ", ".join(released), dag_run.run_id, how)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _release_run(dag_run, "succeeded")


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _release_run(dag_run, "failed")
