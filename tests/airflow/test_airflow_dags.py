"""The Airflow provider through ``dag.test()``, where that adds something the real
deployment (``test_airflow_deployment.py``) does not: the example pipeline with the
service on the ``polars_cloud`` backend (a fake Polars Cloud that the real client talks
to), where the service really holds and uses the Polars Cloud secret; and
``examples/run_dag.py`` itself."""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from devkit.airflow_env import ROOT, AirflowEnv
from devkit.live import Pclease, start_pclease, wait_for
from tests.fakepc import FakePolarsCloud

pytestmark = pytest.mark.live

EXAMPLE = ROOT / "examples" / "dags" / "pclease_seed_pipeline.py"
CLIENT_ID = "pclease-airflow-test"


def airflow_for(pclease: Pclease, home: Path) -> AirflowEnv:
    env = AirflowEnv(
        home,
        EXAMPLE.parent,
        PCLEASE_DEMO_LAKE=str(pclease.lake),
        AIRFLOW__PCLEASE__DASHBOARD_URL=pclease.server.url,
    ).migrate()
    env.add_pclease_connection("pclease_default", pclease.server.url, pclease.token)
    return env


def test_example_dag_on_polars_cloud_keeps_its_secret_in_the_service(tmp_path: Path) -> None:
    secret = "pcs_" + secrets.token_urlsafe(24)
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
            run = airflow.run_dag(EXAMPLE, "pclease_seed_pipeline")
            assert run.state == "success", run.output[-4000:]
            assert set(run.tasks.values()) == {"success"}, run
            revenue = pl.read_parquet(pclease.lake / "joined" / "revenue_by_customer.parquet")
            assert revenue["orders"].sum() == 1960  # every order with a positive amount
            leases = pclease.leases("pclease_seed_pipeline")
            assert len(leases) == 4
            assert {lease["state"] for lease in leases} == {"released"}
            for context_id in {lease["context_id"] for lease in leases}:
                wait_for(
                    lambda context_id=context_id: pclease.context(context_id)["state"] == "stopped",
                    timeout_s=30,
                    what=f"context {context_id} to stop after its grace period",
                )
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
    assert pclease.token not in airflow_side
    for token in used:
        assert token not in airflow_side


def test_run_dag_names_the_dags_a_file_has(tmp_path: Path) -> None:
    airflow = AirflowEnv(tmp_path / "airflow", EXAMPLE.parent)
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
