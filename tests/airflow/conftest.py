"""The real Airflow 3 deployment the Airflow tests share (started once per session)."""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: How long a context of the "slow" profile boots.
SLOW_BOOT_S = 8.0
#: The pool of one slot of tests/airflow/dags/pclease_deferrable.py.
ONE_SLOT = "pclease_one_slot"
AIRFLOW_DAGS = [
    ROOT / "examples" / "dags" / "pclease_seed_pipeline.py",
    *sorted((ROOT / "tests" / "airflow" / "dags").glob("*.py")),
]


@pytest.fixture(scope="session")
def airflow_pclease(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The pclease the Airflow deployment uses: the local backend, profiles small, large
    and shared, and a Polars Cloud secret in its environment (which the local backend
    ignores; the Airflow side must never see it all the same)."""
    from devkit.live import start_pclease

    service = start_pclease(
        tmp_path_factory.mktemp("pclease"),
        backend={"backend": "local"},
        env={
            "POLARS_CLOUD_CLIENT_ID": "pclease-airflow-test",
            "POLARS_CLOUD_CLIENT_SECRET": "pcs_" + secrets.token_urlsafe(24),
        },
        profile={"local": {"boot_delay_s": 0.3}},
        # A context that boots for seconds: what a deferrable task gives its slot back for.
        extra_profiles={"slow": {"local": {"boot_delay_s": SLOW_BOOT_S}}},
    )
    try:
        yield service
    finally:
        service.server.stop()


@pytest.fixture(scope="session")
def airflow(airflow_pclease: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Airflow 3 as it runs for real: scheduler (LocalExecutor, parallelism 8), DAG
    processor, API server and triggerer as processes, on a PostgreSQL metastore made for
    this session, emitting OpenLineage events to ``openlineage.jsonl`` under its home.
    ``pclease_default`` is added with ``airflow connections add`` (the
    metastore); ``pclease_env`` comes from an environment variable and
    ``pclease_secrets`` from a secrets backend (Airflow's local-filesystem one)."""
    from devkit.airflow_deployment import AirflowDeployment

    pclease = airflow_pclease
    tmp = tmp_path_factory.mktemp("airflow")
    dags = tmp / "dags"
    dags.mkdir()
    for dag_file in AIRFLOW_DAGS:
        shutil.copy(dag_file, dags / dag_file.name)
    address = {
        "conn_type": "pclease",
        "host": "127.0.0.1",
        "port": pclease.server.port,
        "password": pclease.token,
    }
    connections_file = tmp / "secrets" / "connections.json"
    connections_file.parent.mkdir()
    connections_file.write_text(json.dumps({"pclease_secrets": address}))
    deployment = AirflowDeployment(
        tmp / "home",
        dags,
        env={
            "PCLEASE_DEMO_LAKE": str(pclease.lake),
            "PCLEASE_TEST_DIR": str(pclease.exchange),
            "AIRFLOW__PCLEASE__DASHBOARD_URL": pclease.server.url,
            "AIRFLOW_CONN_PCLEASE_ENV": json.dumps(address),
            "AIRFLOW__SECRETS__BACKEND": (
                "airflow.secrets.local_filesystem.LocalFilesystemBackend"
            ),
            "AIRFLOW__SECRETS__BACKEND_KWARGS": json.dumps(
                {"connections_file_path": str(connections_file)}
            ),
            "AIRFLOW__OPENLINEAGE__NAMESPACE": "pclease-tests",
            "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
                {
                    "type": "file",
                    "log_file_path": str(tmp / "home" / "openlineage.jsonl"),
                    "append": True,
                }
            ),
        },
    )
    deployment.start()
    try:
        deployment.add_connection(
            "pclease_default",
            "pclease",
            host="127.0.0.1",
            port=pclease.server.port,
            password=pclease.token,
        )
        deployment.create_pool(ONE_SLOT, 1)
        deployment.wait_for_dags("pclease_seed_pipeline", "plain_dag", "pclease_deferred_slot")
        yield deployment
    finally:
        deployment.stop()
