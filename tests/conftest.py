"""Fixtures every group of tests shares: a fresh PostgreSQL database per session, the
database URL each test runs on (SQLite and PostgreSQL), and the in-process harness.

::

    unit/      configuration, credentials, migrations: no service
    api/       the service in-process (tests/harness.py): fake clock, memory backend
    backends/  the local backend's real worker processes; polars_cloud against fakepc/
    live/      a real `pclease serve` process (devkit/live.py), the CLI
    deploy/    the image, compose, Kubernetes and systemd files
    browser/   the dashboard in Debian's chromium
    airflow/   a real Airflow 3 (devkit/airflow_env.py) against a live service
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from pclease_service.api.app import create_app
from pclease_service.backends.memory import MemoryBackend
from pclease_service.clock import FakeClock
from pclease_service.db.migrate import upgrade
from pclease_service.runtime import Service
from tests.harness import PG_ADMIN_DSN, Harness, make_settings, truncate


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


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'pclease.db'}"
    url: str = request.getfixturevalue("pg_database")
    truncate(url)
    return url


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
