"""Release leases the task process could not: a task instance that failed (or was marked
failed) and a DAG run that ended. Listener errors are logged, never raised: Airflow must
not fail a task or a run because pclease was unreachable (the lease TTL still ends them).
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

from airflow_plugin.hooks import PcleaseHook

log = logging.getLogger(__name__)


def _conn_id_of(task: Any) -> str:
    """The connection a task's leases came through: its operator's ``pclease_conn_id``, or
    the default one (a plain task may use ``PcleaseHook()`` itself)."""
    conn_id = getattr(task, "pclease_conn_id", None)
    return conn_id if isinstance(conn_id, str) else PcleaseHook.default_conn_name


def _hook(conn_id: str) -> PcleaseHook | None:
    """A hook that works in a task process and in the scheduler alike; None when the
    connection does not exist (this deployment does not use pclease through it)."""
    hook = PcleaseHook(conn_id)
    try:
        hook.connection  # noqa: B018 (resolve it now, to fall back if needed)
        return hook
    except Exception as exc:
        # Outside a task the Task SDK has no route to the metastore's connections.
        log.debug("pclease: connection %r not found through the Task SDK: %s", conn_id, exc)
    try:
        from airflow.models.connection import Connection

        return PcleaseHook(conn_id, connection=Connection.get_connection_from_secrets(conn_id))
    except Exception:
        log.debug("pclease: no connection %r; nothing to release", conn_id)
        return None


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    hook = _hook(_conn_id_of(getattr(task_instance, "task", None)))
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
            "pclease: could not release the leases of failed task %s: %s", task_instance, exc
        )
        return
    if released:
        log.info("pclease: released %s after task %s failed", ", ".join(released), task_instance)


def _release_run(dag_run: Any, how: str) -> None:
    dag = getattr(dag_run, "dag", None)
    tasks = getattr(dag, "tasks", None) or []
    conn_ids = {PcleaseHook.default_conn_name} | {_conn_id_of(task) for task in tasks}
    for conn_id in sorted(conn_ids):
        hook = _hook(conn_id)
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
