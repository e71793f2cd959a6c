"""The provider under a real Airflow 3: scheduler (LocalExecutor), DAG processor and API
server as processes on a PostgreSQL metastore, driven through Airflow's REST API, against
a live pclease on the local backend (fixtures ``airflow`` and ``airflow_pclease`` in
``tests/airflow/conftest.py``). DAGs: the example pipeline and
``tests/airflow/dags/pclease_deployment.py``."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from devkit.airflow_deployment import DagRun
from devkit.live import Pclease, wait_for

pytestmark = [pytest.mark.live, pytest.mark.postgres, pytest.mark.timeout(300)]

#: docs/airflow.md: a task process that dies (even by SIGKILL) has its lease ended
#: within this many seconds.
KILLED_TASK_LEASE_END_S = 5.0
ALL_RELEASED_BY_THE_TASK = "released by token:airflow"


def exchange(pclease: Pclease, name: str, timeout_s: float = 60) -> dict[str, Any]:
    """What a task left for the test (see ``tell()`` in the DAG file)."""
    path = pclease.exchange / f"{name}.json"
    wait_for(path.exists, timeout_s, f"the task to write {path.name}")
    data: dict[str, Any] = json.loads(path.read_text())
    path.unlink()
    return data


def ended_at(lease: dict[str, Any]) -> float:
    return datetime.fromisoformat(lease["ended_at"]).timestamp()


def running_query(pclease: Pclease, lease_id: str) -> dict[str, Any] | None:
    return next((q for q in pclease.queries(lease_id) if q["state"] == "running"), None)


def contexts_by_profile(leases: list[dict[str, Any]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for lease in leases:
        found.setdefault(lease["profile"], set()).add(lease["context_id"])
    return found


def test_the_example_dag_twice_in_a_row(airflow_pclease: Pclease, airflow: Any) -> None:
    """The connection is in the metastore (``airflow connections add``): each run's end
    makes the listener look it up in the scheduler, which must survive both runs."""
    pclease = airflow_pclease
    runs = [airflow.run_dag("pclease_seed_pipeline") for _ in range(2)]
    for run in runs:
        check_example_run(pclease, airflow, run)
    assert airflow.scheduler_alive()
    assert "DetachedInstanceError" not in airflow.log_of("scheduler")

    # The Polars Cloud secret the service holds is nowhere on the Airflow side: not in
    # any metastore table (XComs, rendered fields, connections, logs), not in any file
    # under AIRFLOW_HOME; the pclease token is stored encrypted.
    metastore = airflow.dump_metastore()
    assert "rendered_task_instance_fields" in metastore and "xcom:" in metastore
    for where, text in (("metastore", metastore), ("files", airflow.logs())):
        assert pclease.cloud_secret not in text, where
        assert pclease.token not in text, where


def check_example_run(pclease: Pclease, airflow: Any, run: DagRun) -> None:
    assert run.state == "success", run
    assert set(run.tasks.values()) == {"success"}, run

    raw_customers = pl.read_csv(pclease.lake / "raw" / "customers.csv")
    raw_orders = pl.read_ndjson(pclease.lake / "raw" / "orders.ndjson")
    customers = pl.read_parquet(pclease.lake / "prepared" / "customers.parquet")
    orders = pl.read_parquet(pclease.lake / "prepared" / "orders.parquet")
    revenue = pl.read_parquet(pclease.lake / "joined" / "revenue_by_customer.parquet")
    assert customers.height == raw_customers.height == 200
    assert customers.schema["signup_date"] == pl.Date
    assert orders.height == raw_orders.filter(pl.col("amount") > 0).height == 1960
    expected = (
        raw_orders.filter(pl.col("amount") > 0)
        .join(raw_customers.with_columns(pl.col("country").str.to_uppercase()), on="customer_id")
        .group_by("customer_id", "name", "country")
        .agg(pl.col("amount").sum().alias("revenue"), pl.len().alias("orders"))
        .sort("customer_id")
    )
    assert_frame_equal(revenue, expected, check_dtypes=False)

    leases = pclease.leases("pclease_seed_pipeline", run.run_id)
    by_task = {lease["holder"]["task_id"]: lease for lease in leases}
    assert set(by_task) == {
        "pclease_warm_large",
        "prepare_dataset_1",
        "prepare_dataset_2",
        "join_datasets",
    }
    assert by_task["join_datasets"]["holder"] == {
        "dag_id": "pclease_seed_pipeline",
        "run_id": run.run_id,
        "task_id": "join_datasets",
        "try_number": 1,
        "map_index": -1,
    }
    # One context per profile: the setup task pre-started "large", the join reused it.
    contexts = contexts_by_profile(leases)
    assert {profile: len(ids) for profile, ids in contexts.items()} == {"small": 1, "large": 1}
    # Every lease was released by the task that held it (the teardown for the warm one),
    # none by the listener ("holder ... released by") and none by expiry.
    assert {lease["state"] for lease in leases} == {"released"}, leases
    for lease in leases:
        assert pclease.release_reasons(lease["id"]) == [ALL_RELEASED_BY_THE_TASK], lease

    # The extra link: the task stored its lease's dashboard URL where the UI reads it.
    link = airflow.xcom(
        "pclease_seed_pipeline", run.run_id, "join_datasets", "_link_PcleaseLeaseLink"
    )
    assert link == f"{pclease.server.url}/ui/leases/{by_task['join_datasets']['id']}"
    assert httpx.get(link).status_code in (200, 303)  # a page, or the sign-in redirect
    check_example_lineage(pclease, airflow, run, by_task)


def check_example_lineage(
    pclease: Pclease, airflow: Any, run: DagRun, by_task: dict[str, dict[str, Any]]
) -> None:
    """What each task's queries read and wrote, as pclease answers it and as an OpenLineage
    backend receives it (the deployment's file transport), is the files the task really
    read and wrote (the join also reads its own output back: an intermediate, not an
    input)."""
    lake = pclease.lake
    raw, prepared = f"{lake}/raw", f"{lake}/prepared"
    revenue = f"{lake}/joined/revenue_by_customer.parquet"
    expected = {
        "prepare_dataset_1": ([f"{raw}/customers.csv"], [f"{prepared}/customers.parquet"]),
        "prepare_dataset_2": ([f"{raw}/orders.ndjson"], [f"{prepared}/orders.parquet"]),
        "join_datasets": (
            [f"{prepared}/customers.parquet", f"{prepared}/orders.parquet"],
            [revenue],
        ),
    }
    # pclease: every query with its own lineage.
    (join_sink, join_collect) = sorted(
        pclease.queries(by_task["join_datasets"]["id"]), key=lambda q: q["created_at"]
    )
    assert (join_sink["inputs"], join_sink["outputs"]) == expected["join_datasets"]
    assert (join_collect["inputs"], join_collect["outputs"]) == ([revenue], [])
    for task in ("prepare_dataset_1", "prepare_dataset_2"):
        (query,) = pclease.queries(by_task[task]["id"])
        assert (query["inputs"], query["outputs"]) == expected[task], task

    # OpenLineage: the COMPLETE event of each task of this run.
    def completed() -> dict[str, tuple[list[str], list[str]]] | None:
        found = {}
        for event in openlineage_events(airflow):
            airflow_facet = event["run"]["facets"].get("airflow") or {}
            if (
                event["eventType"] == "COMPLETE"
                and airflow_facet.get("dagRun", {}).get("run_id") == run.run_id
            ):
                task = event["job"]["name"].split(".", 1)[1]
                found[task] = (
                    sorted(f"{d['namespace']}:{d['name']}" for d in event["inputs"]),
                    sorted(f"{d['namespace']}:{d['name']}" for d in event["outputs"]),
                )
        return found if {*expected, "generate_inputs"} <= set(found) else None

    seen = wait_for(completed, timeout_s=30, what="the OpenLineage events of the run")
    for task, (inputs, outputs) in expected.items():
        assert seen[task] == (
            [f"file:{path}" for path in inputs],
            [f"file:{path}" for path in outputs],
        ), task
    assert seen["generate_inputs"] == ([], [])  # a plain task: no pclease lineage


def openlineage_events(airflow: Any) -> list[dict[str, Any]]:
    path = airflow.home / "openlineage.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.strip()]


def test_parallel_tasks_on_one_profile_share_one_context(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    pclease = airflow_pclease
    run = airflow.run_dag("pclease_parallel")
    assert run.state == "success", run
    assert len(run.tasks) == 6 and set(run.tasks.values()) == {"success"}, run

    leases = pclease.leases("pclease_parallel", run.run_id)
    assert len(leases) == 6
    (context_id,) = contexts_by_profile(leases)["shared"]
    started = [
        e
        for e in pclease.events(context_id=context_id)
        if e["kind"] == "context" and e["to_state"] == "starting"
    ]
    assert len(started) == 1
    seen = [airflow.xcom("pclease_parallel", run.run_id, "share", map_index=i) for i in range(6)]
    assert max(seen) >= 2, seen  # refcounts the tasks themselves read off the context
    assert {lease["state"] for lease in leases} == {"released"}
    for lease in leases:
        assert pclease.release_reasons(lease["id"]) == [ALL_RELEASED_BY_THE_TASK]


def test_a_killed_task_process_ends_its_lease_within_the_bound(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    pclease = airflow_pclease
    run_id = airflow.trigger("pclease_killed")
    task = exchange(pclease, "killed")
    cmdline = Path(f"/proc/{task['pid']}/cmdline").read_bytes().replace(b"\0", b" ")
    assert b"airflow worker --" in cmdline  # the task runner itself, as ps shows it
    assert pclease.lease(task["lease_id"])["state"] == "active"

    killed_at = time.time()
    os.kill(task["pid"], signal.SIGKILL)
    lease = wait_for(
        lambda: (lease := pclease.lease(task["lease_id"]))["state"] != "active" and lease,
        timeout_s=30,
        what="the killed task's lease to end",
    )
    took_s = ended_at(lease) - killed_at
    print(f"lease of the killed task ended {took_s:.3f} s after kill -9")
    assert lease["state"] == "released", lease  # by the watchdog, not by the TTL (20 s)
    assert took_s <= KILLED_TASK_LEASE_END_S

    run = airflow.wait_for_run("pclease_killed", run_id)
    assert run.tasks == {"killed": "failed"}
    assert airflow.scheduler_alive()


def test_a_task_marked_failed_has_its_query_cancelled_and_its_lease_released(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    pclease = airflow_pclease
    run_id = airflow.trigger("pclease_marked_failed")
    task = exchange(pclease, "marked_failed")
    query = wait_for(lambda: running_query(pclease, task["lease_id"]), what="its query to run")

    marked_at = time.time()
    airflow.set_task_state("pclease_marked_failed", run_id, "long_query", "failed")
    lease = wait_for(
        lambda: (lease := pclease.lease(task["lease_id"]))["state"] != "active" and lease,
        what="the lease to end",
    )
    assert lease["state"] == "released"
    cancelled = wait_for(
        lambda: (q := pclease.get(f"/v1/queries/{query['id']}"))["state"] != "running" and q,
        what="the query to stop",
    )
    assert cancelled["state"] == "cancelled", cancelled
    finished = datetime.fromisoformat(cancelled["finished_at"]).timestamp()
    print(
        f"marked failed: lease ended after {ended_at(lease) - marked_at:.2f} s, query "
        f"cancelled after {finished - marked_at:.2f} s"
    )
    run = airflow.wait_for_run("pclease_marked_failed", run_id)
    assert run.tasks == {"long_query": "failed"}
    wait_for(lambda: not Path(f"/proc/{task['pid']}").exists(), what="the task process to end")
    log = airflow.task_log("pclease_marked_failed", run_id, "long_query")
    assert f"pclease lease {task['lease_id']} ended underneath this task" in log, log[-4000:]
    assert airflow.scheduler_alive()


def test_a_lease_revoked_mid_query_fails_the_task_with_the_reason(
    airflow_pclease: Pclease, airflow: Any
) -> None:
    pclease = airflow_pclease
    run_id = airflow.trigger("pclease_lease_lost")
    task = exchange(pclease, "lease_lost")
    query = wait_for(lambda: running_query(pclease, task["lease_id"]), what="its query to run")
    lease = pclease.lease(task["lease_id"])
    pclease.post(f"/v1/contexts/{lease['context_id']}/stop")

    run = airflow.wait_for_run("pclease_lease_lost", run_id)
    assert run.tasks == {"revoked_mid_query": "failed"}
    assert pclease.get(f"/v1/queries/{query['id']}")["state"] == "cancelled"
    log = airflow.task_log("pclease_lease_lost", run_id, "revoked_mid_query")
    lost = f"pclease lease {task['lease_id']} ended underneath this task (revoked"
    assert lost in log, log[-4000:]
    assert "the lease was never lost" not in log


def test_every_way_a_task_fails_ends_its_lease(airflow_pclease: Pclease, airflow: Any) -> None:
    pclease = airflow_pclease
    dag_ids = [
        "pclease_raises_mid_lease",
        "pclease_sigterm",
        "pclease_execution_timeout",
        "pclease_teardown_after_failure",
        "pclease_classic_operator",
    ]
    run_ids = {dag_id: airflow.trigger(dag_id) for dag_id in dag_ids}
    runs = {dag_id: airflow.wait_for_run(dag_id, run_id) for dag_id, run_id in run_ids.items()}

    assert runs["pclease_raises_mid_lease"].tasks == {"explode": "failed"}
    log = airflow.task_log("pclease_raises_mid_lease", run_ids[dag_ids[0]], "explode")
    assert "the task broke while holding its lease" in log
    # on_kill ran from the SIGTERM handler: by the time the task looked, it was released.
    assert airflow.xcom("pclease_sigterm", run_ids["pclease_sigterm"], "terminated") == "released"
    log = airflow.task_log("pclease_sigterm", run_ids["pclease_sigterm"], "terminated")
    assert "task killed: releasing pclease lease" in log
    assert runs["pclease_execution_timeout"].tasks == {"too_slow": "failed"}
    assert runs["pclease_teardown_after_failure"].tasks == {
        "pclease_warm_small": "success",
        "broken": "failed",
        "pclease_warm_small_release": "success",
    }
    for dag_id in dag_ids[:4]:
        (lease,) = pclease.leases(dag_id, run_ids[dag_id])
        assert lease["state"] == "released", (dag_id, lease)
        # By the task (its context manager, on_kill, the teardown), not by the listener.
        reasons = pclease.release_reasons(lease["id"])
        if dag_id == "pclease_execution_timeout" and reasons != [ALL_RELEASED_BY_THE_TASK]:
            # The timeout fired while the lease request was on the wire: the task released
            # its task instance's leases by holder, and its log says so.
            too_slow = f"{dag_id}/{run_ids[dag_id]}/too_slow"
            assert reasons == [f"holder {too_slow} {ALL_RELEASED_BY_THE_TASK}"], reasons
            log = airflow.task_log(dag_id, run_ids[dag_id], "too_slow")
            assert "whose request was interrupted" in log, log[-4000:]
            continue
        assert reasons == [ALL_RELEASED_BY_THE_TASK], dag_id

    classic = runs["pclease_classic_operator"]
    assert classic.tasks == {"squares": "success", "bad_column": "failed"}
    squares = pl.read_csv(pclease.exchange / "squares.csv")
    assert squares["square"].to_list() == [n * n for n in range(7)]
    result = airflow.xcom("pclease_classic_operator", classic.run_id, "squares")
    assert result["rows"] == 7
    assert result["target"] == str(pclease.exchange / "squares.csv")
    log = airflow.task_log("pclease_classic_operator", classic.run_id, "bad_column")
    assert "ColumnNotFoundError" in log


@pytest.mark.parametrize("kept_in", ["default", "env", "secrets"])
def test_the_listener_releases_leaks_wherever_the_connection_is_kept(
    airflow_pclease: Pclease, airflow: Any, kept_in: str
) -> None:
    """``pclease_default`` is in the metastore, ``pclease_env`` in an environment variable,
    ``pclease_secrets`` in a secrets backend."""
    pclease = airflow_pclease
    dag_id = f"pclease_leaks_via_pclease_{kept_in}"
    run = airflow.run_dag(dag_id)
    assert run.tasks == {
        "uses_pclease": "success",
        "leak_and_fail": "failed",
        "leak_and_succeed": "success",
    }
    leases = {
        lease["holder"]["task_id"]: lease
        for lease in pclease.leases(dag_id, run.run_id)
        if lease["holder"]["task_id"] != "uses_pclease"
    }
    assert set(leases) == {"leak_and_fail", "leak_and_succeed"}

    def released() -> dict[str, list[str]] | None:
        reasons = {task: pclease.release_reasons(lease["id"]) for task, lease in leases.items()}
        return reasons if all(reasons.values()) else None

    # The listener releases in the background: shortly after the run ended, not before.
    reasons = wait_for(released, timeout_s=30, what="the listener to release the leaks")
    run_holder = f"holder {dag_id}/{run.run_id}"
    # The failed task's lease went when it failed (the task process's listener); the
    # other one when the run ended (the scheduler's listener).
    assert reasons["leak_and_fail"][0].startswith(f"{run_holder}/leak_and_fail ")
    assert reasons["leak_and_succeed"][0].startswith(f"{run_holder} ")
    assert airflow.scheduler_alive()


class Blackhole:
    """A TCP server that accepts connections, reads what comes, and never answers: a
    pclease that is up but does not respond."""

    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.requests: list[bytes] = []
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._held.append(conn)
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                self.requests.append(conn.recv(65536))

    def open_connections(self) -> int:
        """Connections the client has not given up on yet."""
        still = 0
        for conn in self._held:
            try:
                conn.setblocking(False)
                still += conn.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                still += 1
            except OSError:
                pass
        return still

    def close(self) -> None:
        self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._thread.join(10)
        for conn in self._held:
            conn.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    """Closing it ends the hung release calls, so that the releaser threads of the shared
    deployment (one per process, working off one queue) are free again for later tests."""
    hole = Blackhole()
    yield hole
    hole.close()


def test_the_scheduler_keeps_scheduling_while_pclease_does_not_answer(
    airflow: Any, blackhole: Blackhole
) -> None:
    """``pclease_unreachable`` ends its runs through a connection to a server that never
    answers, with a two-minute timeout. While those releases hang, other DAGs run."""
    airflow.add_connection(
        "pclease_blackhole",
        "pclease",
        host="127.0.0.1",
        port=blackhole.port,
        password="not-a-token",
        extra={"timeout_s": 120},
    )
    baseline = time.monotonic()
    assert airflow.run_dag("plain_dag").state == "success"
    baseline_s = time.monotonic() - baseline

    runs = [airflow.trigger("pclease_unreachable") for _ in range(3)]
    for run_id in runs:
        assert airflow.wait_for_run("pclease_unreachable", run_id).state == "success"
    wait_for(lambda: blackhole.requests, what="the listener to call the silent pclease")
    assert blackhole.requests[0].startswith(b"DELETE /v1/leases?dag_id=pclease_unreachable")

    started = time.monotonic()
    plain = [airflow.run_dag("plain_dag") for _ in range(3)]
    took_s = (time.monotonic() - started) / len(plain)
    assert {run.state for run in plain} == {"success"}
    # Those runs were scheduled and finished while the release call still hung.
    assert blackhole.open_connections() >= 1
    assert airflow.scheduler_alive()
    print(
        f"plain_dag trigger to success: {baseline_s:.1f} s before, {took_s:.1f} s per run "
        f"while {blackhole.open_connections()} release call(s) hung"
    )


def test_provider_metadata_and_the_plugin_registered_once(airflow: Any) -> None:
    plugins = airflow.api("GET", "/api/v2/plugins").json()["plugins"]
    ours = [plugin for plugin in plugins if plugin["name"] == "pclease"]
    assert len(ours) == 1
    assert "airflow_plugin.listener" in str(ours[0]["listeners"])
    hrefs = {view["name"]: view["href"] for view in ours[0]["external_views"]}
    assert hrefs["pclease"].endswith("/ui/")
    assert "{DAG_ID}" in hrefs["pclease leases"] and "{RUN_ID}" in hrefs["pclease leases"]
    errors = airflow.api("GET", "/api/v2/plugins/importErrors").json()
    assert errors["total_entries"] == 0, errors

    providers = airflow.api("GET", "/api/v2/providers").json()["providers"]
    assert [p["package_name"] for p in providers if p["package_name"] == "pclease"] == ["pclease"]
    script = """
import json
from airflow.providers_manager import ProvidersManager
pm = ProvidersManager()
info = pm.providers["pclease"].data
print(json.dumps({
    "hook": pm.hooks["pclease"].hook_class_name,
    "decorators": sorted(pm.taskflow_decorators),
    "links": sorted(pm.extra_links_class_names),
    "info": info,
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=airflow.env,
        cwd=airflow.home,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["hook"] == "airflow_plugin.hooks.PcleaseHook"
    assert "pclease" in found["decorators"]
    assert "airflow_plugin.links.PcleaseLeaseLink" in found["links"]
    integrations = found["info"]["integrations"]
    assert integrations[0]["integration-name"] == "pclease"
    assert found["info"]["operators"][0]["python-modules"] == ["airflow_plugin.operators"]
    assert found["info"]["hooks"][0]["python-modules"] == ["airflow_plugin.hooks"]
