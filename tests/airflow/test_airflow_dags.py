"""The Airflow provider end to end: a real Airflow 3 (``airflow db migrate``, then
``dag.test()``) runs DAGs against a live pclease server on the local backend."""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from devkit.airflow_env import ROOT, AirflowEnv, DagRunResult
from devkit.live import LiveServer, run_cli, write_config
from tests.fakepc import FakePolarsCloud

pytestmark = pytest.mark.live

EXAMPLE = ROOT / "examples" / "dags" / "pclease_seed_pipeline.py"
FAILURES = Path(__file__).parent / "dags" / "pclease_failures.py"
GRACE_S = 3
CLIENT_ID = "pclease-airflow-test"


@dataclass
class Pclease:
    server: LiveServer
    token: str
    admin: str
    lake: Path
    exchange: Path
    cloud_secret: str

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(
            self.server.url + path,
            params=params,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()

    def leases(self, dag_id: str) -> list[dict[str, Any]]:
        return list(self.get("/v1/leases", dag_id=dag_id)["leases"])

    def context(self, context_id: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/contexts/{context_id}"))


def start_pclease(
    tmp: Path, *, backend: dict[str, Any], env: dict[str, str], profile: dict[str, Any]
) -> Pclease:
    """A live pclease with profiles small and large, holding a Polars Cloud secret."""
    lake, exchange = tmp / "lake", tmp / "exchange"
    lake.mkdir(parents=True)
    exchange.mkdir()
    shape = {"idle_grace_s": GRACE_S, "data_roots": [str(lake), str(exchange)], **profile}
    config = write_config(
        tmp / "pclease.toml",
        {
            "data_dir": str(tmp / "svc"),
            "database_url": f"sqlite:///{tmp / 'svc.db'}",
            "reconcile_interval_s": 0.2,
            "lease_ttl_s": 20,
            **backend,
        },
        {
            "small": {"cpus": 1, "memory_gb": 1, "hourly_cost": 0.4, **shape},
            "large": {"cpus": 2, "memory_gb": 2, "hourly_cost": 1.6, **shape},
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLARS_CLOUD_")} | env
    run_cli(config, "db", "upgrade", env=env)
    token = run_cli(config, "token", "create", "airflow", "--scope", "lease", env=env).strip()
    admin = run_cli(config, "token", "create", "ops", "--scope", "admin", env=env).strip()
    server = LiveServer(config, tmp / "server.log", env=env).start()
    return Pclease(server, token, admin, lake, exchange, env["POLARS_CLOUD_CLIENT_SECRET"])


def airflow_for(pclease: Pclease, home: Path) -> AirflowEnv:
    env = AirflowEnv(
        home,
        EXAMPLE.parent,
        PCLEASE_DEMO_LAKE=str(pclease.lake),
        PCLEASE_TEST_DIR=str(pclease.exchange),
        AIRFLOW__PCLEASE__DASHBOARD_URL=pclease.server.url,
    ).migrate()
    env.add_pclease_connection("pclease_default", pclease.server.url, pclease.token)
    return env


def cloud_secret() -> str:
    return "pcs_" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def pclease(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pclease]:
    # The local backend ignores the Polars Cloud secret: the test on Polars Cloud below is
    # the one where the service really uses it.
    service = start_pclease(
        tmp_path_factory.mktemp("pclease"),
        backend={"backend": "local"},
        env={"POLARS_CLOUD_CLIENT_ID": CLIENT_ID, "POLARS_CLOUD_CLIENT_SECRET": cloud_secret()},
        profile={"local": {"boot_delay_s": 0.3}},
    )
    try:
        yield service
    finally:
        service.server.stop()


@pytest.fixture(scope="module")
def airflow(pclease: Pclease, tmp_path_factory: pytest.TempPathFactory) -> AirflowEnv:
    return airflow_for(pclease, tmp_path_factory.mktemp("airflow"))


def wait_for(predicate: Any, timeout_s: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_example_dag_runs_the_seed_pipeline(pclease: Pclease, airflow: AirflowEnv) -> None:
    check_example_run(pclease, airflow)


def test_example_dag_on_polars_cloud_keeps_its_secret_in_the_service(tmp_path: Path) -> None:
    """The same pipeline with the service on the polars_cloud backend (a fake Polars Cloud
    that the real client talks to): the service now really holds and uses the secret."""
    secret = cloud_secret()
    with FakePolarsCloud(
        client_id=CLIENT_ID, client_secret=secret, workspace="ws", data_dir=tmp_path / "cloud"
    ) as fake:
        pclease = start_pclease(
            tmp_path / "pclease",
            backend={
                "backend": "polars_cloud",
                "polars_cloud": {
                    "api_addr": fake.url,
                    "token_url": fake.token_url,
                    "workspace": "ws",
                },
            },
            env={"POLARS_CLOUD_CLIENT_ID": CLIENT_ID, "POLARS_CLOUD_CLIENT_SECRET": secret},
            profile={},
        )
        try:
            airflow = airflow_for(pclease, tmp_path / "airflow")
            check_example_run(pclease, airflow)
            assert fake.running() == []
            used = {call.bearer for call in fake.calls if call.bearer}
            assert len(fake.computes()) == 2
            # Polars Cloud's query list names the Airflow task behind each query.
            tasks = {
                label.removeprefix("airflow.task_id=")
                for q in fake.queries()
                for label in q["labels"]
                if label.startswith("airflow.task_id=")
            }
            assert tasks == {"prepare_dataset_1", "prepare_dataset_2", "join_datasets"}
        finally:
            pclease.server.stop()
    assert used, "the service never called Polars Cloud"
    airflow_side = "\n".join((airflow.dump_metastore(), airflow.logs(), airflow.last_output))
    assert secret not in airflow_side
    for token in used:
        assert token not in airflow_side


def check_example_run(pclease: Pclease, airflow: AirflowEnv) -> None:
    run = airflow.run_dag(EXAMPLE, "pclease_seed_pipeline")
    assert run.state == "success", run.output[-4000:]
    assert set(run.tasks.values()) == {"success"}, run

    raw_customers = pl.read_csv(pclease.lake / "raw" / "customers.csv")
    raw_orders = pl.read_ndjson(pclease.lake / "raw" / "orders.ndjson")
    customers = pl.read_parquet(pclease.lake / "prepared" / "customers.parquet")
    orders = pl.read_parquet(pclease.lake / "prepared" / "orders.parquet")
    revenue = pl.read_parquet(pclease.lake / "joined" / "revenue_by_customer.parquet")
    assert customers.height == raw_customers.height == 200
    assert customers.schema["signup_date"] == pl.Date
    assert set(customers["country"]) == {"NL", "DE", "FR", "BE", "US"}
    assert orders.height == raw_orders.filter(pl.col("amount") > 0).height == 1960
    assert orders.schema["ordered_at"] == pl.Datetime("us")
    expected = (
        raw_orders.filter(pl.col("amount") > 0)
        .join(raw_customers.with_columns(pl.col("country").str.to_uppercase()), on="customer_id")
        .group_by("customer_id", "name", "country")
        .agg(pl.col("amount").sum().alias("revenue"), pl.len().alias("orders"))
        .sort("customer_id")
    )
    assert_frame_equal(revenue, expected, check_dtypes=False)

    leases = pclease.leases("pclease_seed_pipeline")
    by_task = {lease["holder"]["task_id"]: lease for lease in leases}
    assert set(by_task) == {
        "pclease_warm_large",
        "prepare_dataset_1",
        "prepare_dataset_2",
        "join_datasets",
    }
    join = by_task["join_datasets"]
    assert join["holder"] == {
        "dag_id": "pclease_seed_pipeline",
        "run_id": run.run_id,
        "task_id": "join_datasets",
        "try_number": 1,
        "map_index": -1,
    }
    # One context per profile: the setup task pre-started "large", the join reused it.
    contexts = {lease["profile"]: set() for lease in leases}
    for lease in leases:
        contexts[lease["profile"]].add(lease["context_id"])
    assert {profile: len(ids) for profile, ids in contexts.items()} == {"small": 1, "large": 1}
    assert by_task["join_datasets"]["context_id"] == by_task["pclease_warm_large"]["context_id"]
    # Nothing is left: every lease ended, and both contexts stop after their grace period.
    assert all(lease["state"] == "released" for lease in leases), leases
    for ids in contexts.values():
        (context_id,) = ids
        wait_for(
            lambda context_id=context_id: pclease.context(context_id)["state"] == "stopped",
            timeout_s=GRACE_S + 20,
            what=f"context {context_id} to stop after its grace period",
        )
    starts = [
        e
        for e in pclease.get("/v1/events", limit=5000)["events"]
        if e["kind"] == "context"
        and e["to_state"] == "starting"
        and e["context_id"] in set().union(*contexts.values())
    ]
    assert len(starts) == 2
    # Each task released its own lease; none was left for the listener.
    for lease in leases:
        assert release_reasons(pclease, lease) == ["released by token:airflow"], lease

    # The extra link: the task stored its lease's dashboard URL where the UI reads it.
    link = airflow.xcom(
        "pclease_seed_pipeline", run.run_id, "join_datasets", "_link_PcleaseLeaseLink"
    )
    assert link == f"{pclease.server.url}/ui/leases/{join['id']}"
    assert httpx.get(link).status_code in (200, 303)  # a page, or the sign-in redirect

    # The Polars Cloud secret the service holds is nowhere on the Airflow side: not in any
    # metastore table (XComs, rendered fields, connections, logs), not in any log file, not
    # in the task output; the pclease token is stored encrypted.
    metastore = airflow.dump_metastore()
    assert "rendered_task_instance_fields" in metastore and "xcom:" in metastore
    for where, text in (
        ("metastore", metastore),
        ("log files", airflow.logs()),
        ("task output", run.output),
    ):
        assert pclease.cloud_secret not in text, where
        assert pclease.token not in text, where


def release_reasons(pclease: Pclease, lease: dict[str, Any]) -> list[str]:
    events = pclease.get("/v1/events", lease_id=lease["id"])["events"]
    return [e["reason"] for e in events if e["to_state"] == "released"]


def _released(pclease: Pclease, dag_id: str) -> list[dict[str, Any]]:
    leases = pclease.leases(dag_id)
    assert leases, f"{dag_id} took no lease"
    return leases


def test_a_task_that_raises_releases_its_lease(pclease: Pclease, airflow: AirflowEnv) -> None:
    run = airflow.run_dag(FAILURES, "pclease_raises_mid_lease")
    assert run.state == "failed"
    assert run.tasks == {"explode": "failed"}
    assert "the task broke while holding its lease" in run.output
    (lease,) = _released(pclease, "pclease_raises_mid_lease")
    assert lease["state"] == "released"
    # By the task's own context manager, not by the listener ("holder ... released by").
    assert release_reasons(pclease, lease) == ["released by token:airflow"]


def test_on_kill_releases_the_lease(pclease: Pclease, airflow: AirflowEnv) -> None:
    run = airflow.run_dag(FAILURES, "pclease_sigterm")
    # on_kill ran from the SIGTERM handler: by the time the task looked, it was released.
    assert airflow.xcom("pclease_sigterm", run.run_id, "terminated", "return_value") == ("released")
    assert "task killed: releasing pclease lease" in run.output

    run = airflow.run_dag(FAILURES, "pclease_execution_timeout")
    assert run.tasks == {"too_slow": "failed"}
    lease_id = (pclease.exchange / "timeout.lease").read_text()
    (lease,) = _released(pclease, "pclease_execution_timeout")
    assert lease["id"] == lease_id
    assert lease["state"] == "released"
    assert release_reasons(pclease, lease) == ["released by token:airflow"]


def test_teardown_releases_after_a_failing_task(pclease: Pclease, airflow: AirflowEnv) -> None:
    run = airflow.run_dag(FAILURES, "pclease_teardown_after_failure")
    assert run.state == "failed"
    assert run.tasks == {
        "pclease_warm_small": "success",
        "broken": "failed",
        "pclease_warm_small_release": "success",
    }
    (lease,) = _released(pclease, "pclease_teardown_after_failure")
    assert lease["holder"]["task_id"] == "pclease_warm_small"
    assert lease["state"] == "released"
    # By the teardown task, before the run ended (the listener's reason names the holder).
    assert release_reasons(pclease, lease) == ["released by token:airflow"]


def test_a_lease_lost_underneath_fails_the_task_clearly(
    pclease: Pclease, airflow: AirflowEnv
) -> None:
    marker = pclease.exchange / "lost.lease"
    marker.unlink(missing_ok=True)
    revoked: list[str] = []

    def revoke_when_leased() -> None:
        lease_id = wait_for(lambda: marker.exists() and marker.read_text(), what="the lease")
        lease = pclease.get(f"/v1/leases/{lease_id}")
        httpx.post(
            f"{pclease.server.url}/v1/contexts/{lease['context_id']}/stop",
            headers={"Authorization": f"Bearer {pclease.admin}"},
        ).raise_for_status()
        revoked.append(lease_id)

    thread = threading.Thread(target=revoke_when_leased)
    thread.start()
    try:
        run = airflow.run_dag(FAILURES, "pclease_lease_lost")
    finally:
        thread.join(60)
    assert revoked
    assert run.tasks == {"keeps_working": "failed"}
    assert f"pclease lease {revoked[0]} ended underneath this task (revoked" in run.output, (
        run.output[-6000:]
    )
    assert "the lease was never lost" not in run.output


def test_listener_releases_what_tasks_left_behind(pclease: Pclease, airflow: AirflowEnv) -> None:
    run = airflow.run_dag(FAILURES, "pclease_listener_cleans_up")
    assert run.tasks == {
        "uses_pclease": "success",
        "leak_and_fail": "failed",
        "leak_and_succeed": "success",
    }
    leases = {
        lease["holder"]["task_id"]: lease
        for lease in pclease.leases("pclease_listener_cleans_up")
        if lease["holder"]["task_id"] != "uses_pclease"
    }
    assert {task: lease["state"] for task, lease in leases.items()} == {
        "leak_and_fail": "released",
        "leak_and_succeed": "released",
    }
    reasons = {
        task: [
            e["reason"]
            for e in pclease.get("/v1/events", lease_id=lease["id"])["events"]
            if e["to_state"] == "released"
        ]
        for task, lease in leases.items()
    }
    # The failed task's lease went when it failed; the other one when the run ended.
    run_holder = f"holder pclease_listener_cleans_up/{run.run_id}"
    assert reasons["leak_and_fail"][0].startswith(f"{run_holder}/leak_and_fail ")
    assert reasons["leak_and_succeed"][0].startswith(f"{run_holder} ")


def test_classic_operator_templates_and_raises_polars_errors(
    pclease: Pclease, airflow: AirflowEnv
) -> None:
    run: DagRunResult = airflow.run_dag(FAILURES, "pclease_classic_operator")
    assert run.tasks == {"squares": "success", "bad_column": "failed"}
    squares = pl.read_csv(pclease.exchange / "squares.csv")
    assert squares["square"].to_list() == [n * n for n in range(7)]
    result = airflow.xcom("pclease_classic_operator", run.run_id, "squares", "return_value")
    assert result["rows"] == 7
    assert result["target"] == str(pclease.exchange / "squares.csv")
    assert "ColumnNotFoundError" in run.output


def test_provider_and_plugin_are_registered(airflow: AirflowEnv) -> None:
    script = """
import json
from airflow.providers_manager import ProvidersManager
from airflow import plugins_manager
pm = ProvidersManager()
hook = pm.hooks["pclease"]
views = [v for v in plugins_manager.get_plugin_info() if v["name"] == "pclease"]
print(json.dumps({
    "provider": "pclease" in pm.providers,
    "hook": hook.hook_class_name if hook else None,
    "decorators": sorted(pm.taskflow_decorators),
    "plugin": views[0] if views else None,
}, default=str))
"""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script], env=airflow.env, capture_output=True, text=True, timeout=60
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["provider"] is True
    assert info["hook"] == "airflow_plugin.hooks.PcleaseHook"
    assert "pclease" in info["decorators"]
    plugin = info["plugin"]
    assert plugin is not None
    hrefs = {view["name"]: view["href"] for view in plugin["external_views"]}
    assert hrefs["pclease"].endswith("/ui/")
    assert "{DAG_ID}" in hrefs["pclease leases"] and "{RUN_ID}" in hrefs["pclease leases"]
    assert "airflow_plugin.listener" in str(plugin["listeners"])


def test_run_dag_names_the_dags_a_file_has(airflow: AirflowEnv) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "run_dag.py"), str(EXAMPLE), "no_such_dag"],
        env={**airflow.env, "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE.parent)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert (
        f"no DAG 'no_such_dag' in {EXAMPLE} (it has: pclease_seed_pipeline)"
        in result.stderr.strip()
    )
