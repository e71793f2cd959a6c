from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import text

from pclease_service import store, tokens
from pclease_service.api.app import create_app
from pclease_service.backends.memory import MemoryBackend
from pclease_service.clock import FakeClock
from pclease_service.config import Settings
from pclease_service.db.engine import create_db_engine
from pclease_service.db.migrate import upgrade
from pclease_service.db.schema import metadata
from pclease_service.runtime import Service

PG_ADMIN_DSN = os.environ.get("PCLEASE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")

PROFILES: dict[str, Any] = {
    "small": {
        "cpus": 1,
        "memory_gb": 1,
        "idle_grace_s": 30,
        "hourly_cost": 0.5,
        "max_leases_per_context": 4,
        "max_contexts": 2,
    },
    "large": {"cpus": 2, "memory_gb": 2, "idle_grace_s": 60, "hourly_cost": 2.0},
}


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, migrated to head."""
    name = f"pclease_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    url = f"{url}/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _truncate(url: str) -> None:
    engine = create_db_engine(url, pool_size=1)
    with engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pclease.db'}"
    url: str = request.getfixturevalue("pg_database")
    _truncate(url)
    return url


@dataclass
class Harness:
    """An in-process service with a fake clock and the memory backend, driven by hand."""

    service: Service
    clock: FakeClock
    backend: MemoryBackend
    client: httpx.AsyncClient
    headers: dict[str, str]

    async def tick(self, seconds: float = 0.0) -> None:
        """Move the clock, run one reconciler and one query-runner tick, and wait for the
        reconciler's backend calls (queries keep running until they finish)."""
        if seconds:
            self.clock.advance(seconds)
        await self.service.reconciler.tick()
        await self.service.reconciler.drain()
        await self.service.runner.tick()
        for _ in range(5):
            await asyncio.sleep(0)

    async def settle(self, ticks: int = 3) -> None:
        for _ in range(ticks):
            await self.tick()

    def token(self, name: str, *scopes: str) -> dict[str, str]:
        value = tokens.generate()
        self.service.db.write_sync(
            lambda tx: store.insert_token(
                tx, name=name, token_hash=tokens.hash_token(value), scopes=scopes
            )
        )
        return {"Authorization": f"Bearer {value}"}

    async def lease(
        self, profile: str = "small", headers: dict[str, str] | None = None, **body: Any
    ) -> dict[str, Any]:
        response = await self.client.post(
            "/v1/leases", json={"profile": profile, **body}, headers=headers or self.headers
        )
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()
        return data

    async def context(self, context_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/contexts/{context_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data

    async def get_lease(self, lease_id: str) -> dict[str, Any]:
        response = await self.client.get(f"/v1/leases/{lease_id}", headers=self.headers)
        assert response.status_code == 200, response.text
        data: dict[str, Any] = response.json()
        return data


def make_settings(tmp_path: Path, database_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "database_url": database_url,
        "backend": "memory",
        "profiles": PROFILES,
        "lease_ttl_s": 30,
        "lease_wait_default_s": 0,
        "reconcile_interval_s": 0.05,
        "health_check_interval_s": 1,
        "orphan_sweep_interval_s": 3600,
        "token_cache_s": 0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def make_harness(tmp_path: Path, database_url: str) -> AsyncIterator[Any]:
    made: list[Harness] = []

    async def make(**overrides: Any) -> Harness:
        clock = FakeClock()
        backend = MemoryBackend(clock)
        settings = make_settings(tmp_path, database_url, **overrides)
        service = Service(settings, clock=clock, backend=backend, run_reconciler=False)
        await service.start()
        app = create_app(service)
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://pclease.test"
        )
        harness = Harness(service, clock, backend, client, {})
        harness.headers = harness.token(f"admin-{len(made)}", "admin")
        made.append(harness)
        return harness

    yield make
    for harness in made:
        await harness.client.aclose()
        await harness.service.stop()


@pytest.fixture
async def h(make_harness: Any) -> Harness:
    harness: Harness = await make_harness()
    return harness


# -- a real Airflow deployment, shared by the Airflow tests ------------------------------

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_DAGS = [
    ROOT / "examples" / "dags" / "pclease_seed_pipeline.py",
    *sorted((ROOT / "tests" / "dags").glob("*.py")),
]


@pytest.fixture(scope="session")
def airflow_pclease(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The pclease the Airflow deployment uses: the local backend, profiles small, large
    and shared, and a Polars Cloud secret in its environment (which the local backend
    ignores; the Airflow side must never see it all the same)."""
    from tests.live import start_pclease

    service = start_pclease(
        tmp_path_factory.mktemp("pclease"),
        backend={"backend": "local"},
        env={
            "POLARS_CLOUD_CLIENT_ID": "pclease-airflow-test",
            "POLARS_CLOUD_CLIENT_SECRET": "pcs_" + secrets.token_urlsafe(24),
        },
        profile={"local": {"boot_delay_s": 0.3}},
    )
    try:
        yield service
    finally:
        service.server.stop()


@pytest.fixture(scope="session")
def airflow(airflow_pclease: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Airflow 3 as it runs for real: scheduler (LocalExecutor, parallelism 8), DAG
    processor and API server as processes, on a PostgreSQL metastore made for this
    session. ``pclease_default`` is added with ``airflow connections add`` (the
    metastore); ``pclease_env`` comes from an environment variable and
    ``pclease_secrets`` from a secrets backend (Airflow's local-filesystem one)."""
    from pclease_dev.airflow_deployment import AirflowDeployment

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
        deployment.wait_for_dags("pclease_seed_pipeline", "plain_dag")
        yield deployment
    finally:
        deployment.stop()
