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

#: Operators defined by this provider carry ``pclease_conn_id``; the serialized form of a
#: DAG (what the scheduler sees) keeps the task's module instead.
_OUR_MODULE = "airflow_plugin."


def _conn_id_of(task: Any) -> str | None:
    conn_id = getattr(task, "pclease_conn_id", None)
    if isinstance(conn_id, str):
        return conn_id
    module = getattr(task, "_task_module", None) or type(task).__module__
    if isinstance(module, str) and module.startswith(_OUR_MODULE):
        return PcleaseHook.default_conn_name
    return None


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    conn_id = _conn_id_of(getattr(task_instance, "task", None))
    if conn_id is None:
        return
    try:
        released = PcleaseHook(conn_id).release_holder(
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
    conn_ids = {conn_id for task in tasks if (conn_id := _conn_id_of(task)) is not None}
    for conn_id in sorted(conn_ids):
        try:
            released = PcleaseHook(conn_id).release_holder(dag_run.dag_id, dag_run.run_id)
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
