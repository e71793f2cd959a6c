"""Release leases the task process could not: a task instance that failed (or was marked
failed, or was found dead by the scheduler) and a DAG run that ended.

These hooks run inside Airflow's own loops: the DAG-run ones in the scheduler, inside its
ORM session. So they only read plain attributes of the run or task instance and queue a
release for :mod:`airflow_plugin.releases`, whose background thread resolves the
connection and calls pclease. Nothing here waits on the network or touches Airflow's
session, and nothing raises: Airflow must never stall or fail because of pclease.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

from airflow_plugin.hooks import PcleaseHook
from airflow_plugin.releases import (
    ReleaseRequest,
    in_task_process,
    releaser,
    resolve_connection,
)

log = logging.getLogger(__name__)

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
    """The connection a task's leases came through: its operator's ``pclease_conn_id``
    (serialized with the DAG, so the scheduler sees it too), or the default one (a plain
    task may use ``PcleaseHook()`` itself)."""
    conn_id = getattr(task, "pclease_conn_id", None)
    return conn_id if isinstance(conn_id, str) and conn_id else PcleaseHook.default_conn_name


def _is_ours(task: Any) -> bool:
    task_type = getattr(task, "task_type", None) or type(task).__name__
    return task_type in _OUR_TASK_TYPES


@hookimpl
def on_task_instance_failed(previous_state: Any, task_instance: Any, error: Any) -> None:
    """Any failed task: it may have leased through ``PcleaseHook`` in a plain task."""
    try:
        map_index = getattr(task_instance, "map_index", None)
        conn_id = _conn_id_of(getattr(task_instance, "task", None))
        connection = None
        if in_task_process():
            # A task process asks its supervisor for connections, which only this thread
            # may do before the process exits; anywhere else the worker thread looks it up.
            connection = resolve_connection(conn_id)
            if connection is None:
                return  # this deployment has no such connection: nothing was leased
        releaser().submit(
            ReleaseRequest(
                conn_id=conn_id,
                dag_id=str(task_instance.dag_id),
                run_id=str(task_instance.run_id),
                task_id=str(task_instance.task_id),
                map_index=map_index if isinstance(map_index, int) else None,
                why="the task instance failed",
                connection=connection,
            )
        )
    except Exception:
        log.warning("pclease: could not queue the release of %s", task_instance, exc_info=True)


def _release_run(dag_run: Any, how: str) -> None:
    """Only DAGs with a pclease task (or, when the run's DAG is not at hand, through the
    default connection): this runs in the scheduler for every DAG run."""
    try:
        dag = getattr(dag_run, "dag", None)
        if dag is None:
            conn_ids = {PcleaseHook.default_conn_name}
        else:
            tasks = getattr(dag, "tasks", None) or []
            conn_ids = {_conn_id_of(task) for task in tasks if _is_ours(task)}
        for conn_id in sorted(conn_ids):
            releaser().submit(
                ReleaseRequest(
                    conn_id=conn_id,
                    dag_id=str(dag_run.dag_id),
                    run_id=str(dag_run.run_id),
                    why=f"the DAG run {how}",
                )
            )
    except Exception:
        log.warning("pclease: could not queue the release of run %s", dag_run, exc_info=True)


@hookimpl
def on_dag_run_success(dag_run: Any, msg: str) -> None:
    _release_run(dag_run, "succeeded")


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    _release_run(dag_run, "failed")
