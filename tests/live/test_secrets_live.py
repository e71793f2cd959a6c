"""Secrets held by the service, tested with their real values: they appear in no log line,
no API or page response, no database row, no spooled file and no worker's environment."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from sqlalchemy import select

from devkit.live import LiveServer, run_cli, write_config
from pclease_client import PcleaseClient
from pclease_service.dashboard.sessions import LOGIN_COOKIE
from pclease_service.db.engine import create_db_engine
from pclease_service.db.schema import metadata

pytestmark = pytest.mark.live


def test_secrets_never_leave_the_service(tmp_path: Path) -> None:
    cloud_secret = "pcs_" + secrets.token_urlsafe(24)
    session_secret = secrets.token_urlsafe(40)
    lake = tmp_path / "lake"
    lake.mkdir()
    database = tmp_path / "svc.db"
    config = write_config(
        tmp_path / "pclease.toml",
        {
            "data_dir": str(tmp_path / "svc"),
            "database_url": f"sqlite:///{database}",
            "backend": "local",
            "reconcile_interval_s": 0.2,
        },
        {"small": {"cpus": 1, "memory_gb": 1, "data_roots": [str(lake)]}},
    )
    env = {
        **os.environ,
        "POLARS_CLOUD_CLIENT_ID": "pclease-test",
        "POLARS_CLOUD_CLIENT_SECRET": cloud_secret,
        "PCLEASE_SESSION_SECRET": session_secret,
    }
    run_cli(config, "db", "upgrade", env=env)
    token = run_cli(config, "token", "create", "etl", "--scope", "lease", env=env).strip()
    admin = run_cli(config, "token", "create", "ops", "--scope", "admin", env=env).strip()
    server = LiveServer(config, tmp_path / "server.log", env=env).start()
    values = {
        "cloud secret": cloud_secret,
        "session secret": session_secret,
        "lease token": token,
        "admin token": admin,
    }
    seen: list[str] = []
    try:
        client = PcleaseClient(server.url, token)
        with client.lease("small", holder={"dag_id": "d", "run_id": "r", "task_id": "t"}) as lease:
            lease.remote(pl.LazyFrame({"a": [1, 2]})).sink_parquet(str(lake / "out.parquet"))
            lease.remote(pl.LazyFrame({"a": [1, 2]})).collect()
            handle = client.get_lease(lease.id)
            worker_env = _worker_environments(database)
        client.close()

        admin_headers = {"Authorization": f"Bearer {admin}"}
        for path, status in (
            ("/v1/leases", 200),
            ("/v1/contexts", 200),
            ("/v1/events", 200),
            ("/v1/profiles", 200),
            ("/metrics", 200),
            ("/readyz", 200),
            ("/openapi.json", 200),
            ("/docs", 200),
            (f"/v1/leases/{handle.id}/queries", 200),
            ("/v1/leases/not-a-lease", 404),
            ("/ui/login", 200),
        ):
            response = httpx.get(server.url + path, headers=admin_headers)
            assert response.status_code == status, (path, response.text)
            seen.append(response.text)
        refused = httpx.get(
            f"{server.url}/v1/leases", headers={"Authorization": f"Bearer {cloud_secret}"}
        )
        assert refused.status_code == 401, refused.text
        seen.append(refused.text)
        with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
            login = browser.get("/ui/login")
            seen.append(login.text)
            csrf = login.cookies.get(LOGIN_COOKIE) or ""
            page = browser.post("/ui/login", data={"token": admin, "csrf": csrf})
            assert page.status_code == 200
            assert "Sign out" in page.text, "the sign-in did not work; nothing would be checked"
            seen.append(page.text)
            seen.extend(str(v) for v in browser.cookies.jar)
            for path in ("/ui/", "/ui/events", "/ui/runs", f"/ui/leases/{handle.id}"):
                seen.append(browser.get(path).text)
    finally:
        server.stop()

    rows = _database_dump(database)
    files = [
        p.read_bytes().decode(errors="replace")
        for p in (tmp_path / "svc").rglob("*")
        if p.is_file()
    ]
    places = {
        "server log": server.log(),
        "responses": "\n".join(seen),
        "database": rows,
        "data dir files": "\n".join(files),
        "worker environments": "\n".join(worker_env),
    }
    assert worker_env, "the worker's environment was not read"
    for name, value in values.items():
        for place, text in places.items():
            assert value not in text, f"the {name} leaked into the {place}"


def _database_dump(database: Path) -> str:
    engine = create_db_engine(f"sqlite:///{database}", pool_size=1)
    with engine.connect() as conn:
        dump = "\n".join(
            repr(tuple(row))
            for table in metadata.sorted_tables
            for row in conn.execute(select(table))
        )
    engine.dispose()
    return dump


def _worker_environments(database: Path) -> list[str]:
    """The environment of every live worker and of its executor children."""
    engine = create_db_engine(f"sqlite:///{database}", pool_size=1)
    with engine.connect() as conn:
        handles: list[Any] = [
            row[0]
            for row in conn.exec_driver_sql(
                "SELECT backend_handle FROM contexts WHERE state = 'running'"
            )
        ]
    engine.dispose()
    pids = []
    for handle in handles:
        import json

        pid = int((json.loads(handle) if isinstance(handle, str) else handle)["pid"])
        pids.append(pid)
        children = Path(f"/proc/{pid}/task/{pid}/children")
        if children.exists():
            pids += [int(c) for c in children.read_text().split()]
    return [Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace") for pid in pids]
