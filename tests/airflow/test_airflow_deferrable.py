"""Deferrable pclease tasks under a real Airflow 3 with a running ``airflow triggerer``
(fixtures ``airflow`` and ``airflow_pclease`` in ``tests/airflow/conftest.py``; DAGs in
``tests/airflow/dags/pclease_deferrable.py``): a task gives its worker slot back while its
context boots, a triggerer restarted under a deferred task resumes it with its lease, a
lease revoked while deferred fails the task with the reason, and a deferred task marked
failed has its query cancelled and its lease released. The example DAG, deferrable, runs
in test_airflow_deployment.py (with its lineage)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from devkit.live import Pclease, wait_for
from tests.airflow.conftest import SLOW_BOOT_S
from tests.airflow.test_airflow_deployment import (
    ALL_RELEASED_BY_THE_TASK,
    exchange,
    running_query,
)

pytestmark = [pytest.mark.live, pytest.mark.postgres, pytest.mark.timeout(300)]


def at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def trigger_logs(airflow: Any, dag_id: str, run_id: str) -> dict[int, str]:
    """The trigger's log of ``long_query``, by the id of the triggerer that ran it."""
    folder = airflow.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    found = {}
    for path in (folder / "task_id=long_query").glob("attempt=1.log.trigger.*.log"):
        found[int(path.name.split(".")[-2])] = path.read_text(errors="replace")
    return found


def holding(lease: dict[str, Any], query: dict[str, Any]) -> str:
    return f"holding lease {lease['id']} while query {query['id']} runs"


def deferred_on_its_query(
    airflow: Any, pclease: Pclease, dag_id: str, run_id: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Once the task is deferred and the triggerer holds its lease while its query runs:
    the lease and the query."""

    def deferred() -> tuple[dict[str, Any], dict[str, Any]] | None:
        leases = pclease.leases(dag_id, run_id)
        query = running_query(pclease, leases[0]["id"]) if leases else None
        if query is None:
            return None
        logs = trigger_logs(airflow, dag_id, run_id).values()
        return (leases[0], query) if any(holding(leases[0], query) in x for x in logs) else None

    found: tuple[dict[str, Any], dict[str, Any]] = wait_for(
        deferred, timeout_s=120, what=f"the triggerer to hold {dag_id}'s lease"
    )
    assert airflow.task_instance(dag_id, run_id, "long_query")["state"] == "deferred"
    return found


def test_a_task_deferred_while_its_context_boots_frees_its_worker_slot(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    """The pool has one slot: ``in_the_slot`` runs while ``deferred`` waits for its context."""
    pclease = airflow_pclease
    run = airflow.run_dag("pclease_deferred_slot")
    assert run.tasks == {"deferred": "success", "in_the_slot": "success"}, run
    (lease,) = pclease.leases("pclease_deferred_slot", run.run_id)
    slot = exchange(pclease, "in_the_slot")
    created, activated = at(lease["created_at"]), at(lease["activated_at"])
    print(
        f"context booted {activated - created:.1f} s; in_the_slot ran "
        f"{slot['started'] - created:.1f} s to {slot['ended'] - created:.1f} s after the lease"
    )
    assert activated - created >= SLOW_BOOT_S - 1  # the context booted for seconds
    # The one slot's other task started while the deferred task waited for its context.
    assert created < slot["started"] < activated
    assert lease["state"] == "released"
    assert pclease.release_reasons(lease["id"]) == [ALL_RELEASED_BY_THE_TASK]
    (query,) = pclease.queries(lease["id"])
    assert query["state"] == "succeeded"
    answer = airflow.xcom("pclease_deferred_slot", run.run_id, "deferred")
    assert (answer["lease_id"], answer["rows"]) == (lease["id"], 1)
    log = airflow.task_log("pclease_deferred_slot", run.run_id, "deferred")
    assert "deferring until it runs" in log


def test_a_triggerer_restarted_under_a_deferred_task_resumes_it_with_its_lease(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    pclease = airflow_pclease
    dag_id = "pclease_deferred_restart"
    run_id = airflow.trigger(dag_id)
    lease, query = deferred_on_its_query(airflow, pclease, dag_id, run_id)
    airflow.restart_triggerer()

    run = airflow.wait_for_run(dag_id, run_id, timeout_s=240)
    assert run.tasks == {"long_query": "success"}, run
    # The old triggerer stopped with the trigger running; the new one took it over and
    # fired the event that resumed the task.
    holders = {
        triggerer: "Trigger fired event" in log
        for triggerer, log in trigger_logs(airflow, dag_id, run_id).items()
        if holding(lease, query) in log
    }
    assert len(holders) == 2, holders
    assert holders[max(holders)] and not holders[min(holders)], holders
    # One lease, never lost: active throughout, released by the task when it finished.
    (after,) = pclease.leases(dag_id, run_id)
    assert after["id"] == lease["id"] and after["state"] == "released"
    moves = [e["to_state"] for e in reversed(pclease.events(lease_id=lease["id"]))]
    assert [m for m in moves if m in ("pending", "active", "released", "expired", "revoked")] == [
        "pending",
        "active",
        "released",
    ]
    assert pclease.release_reasons(lease["id"]) == [ALL_RELEASED_BY_THE_TASK]
    assert pclease.get(f"/v1/queries/{query['id']}")["state"] == "succeeded"
    answer = airflow.xcom(dag_id, run_id, "long_query")
    assert (answer["lease_id"], answer["rows"]) == (lease["id"], 1)


def test_a_lease_revoked_while_its_task_is_deferred_fails_the_task_with_the_reason(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    pclease = airflow_pclease
    dag_id = "pclease_deferred_revoked"
    run_id = airflow.trigger(dag_id)
    lease, query = deferred_on_its_query(airflow, pclease, dag_id, run_id)
    pclease.post(f"/v1/contexts/{lease['context_id']}/stop")

    run = airflow.wait_for_run(dag_id, run_id)
    assert run.tasks == {"long_query": "failed"}, run
    assert pclease.get(f"/v1/queries/{query['id']}")["state"] == "cancelled"
    log = airflow.task_log(dag_id, run_id, "long_query")
    assert f"pclease lease {lease['id']} ended underneath this task (revoked" in log, log[-4000:]
    assert airflow.scheduler_alive()


def test_a_deferred_task_marked_failed_has_its_query_cancelled_and_its_lease_released(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    pclease = airflow_pclease
    dag_id = "pclease_deferred_killed"
    run_id = airflow.trigger(dag_id)
    lease, query = deferred_on_its_query(airflow, pclease, dag_id, run_id)
    airflow.set_task_state(dag_id, run_id, "long_query", "failed")

    ended = wait_for(
        lambda: (q := pclease.get(f"/v1/queries/{query['id']}"))["state"] != "running" and q,
        what="the query to stop",
    )
    assert ended["state"] == "cancelled", ended
    released = wait_for(
        lambda: (x := pclease.lease(lease["id"]))["state"] != "active" and x,
        what="the lease to end",
    )
    assert released["state"] == "released", released
    run = airflow.wait_for_run(dag_id, run_id)
    assert run.tasks == {"long_query": "failed"}, run
    # Two parts of the provider act on it, whichever comes first: the trigger's on_kill
    # (cancel, release) and the listener in the API server (release, which cancels).
    assert ended["error"]["message"] in (
        "cancelled by token:airflow",
        "its lease was released",
    ), ended
    assert airflow.scheduler_alive()
