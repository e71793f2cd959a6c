"""The CLI that deployments need: ``serve --no-migrate`` beside a migration job, and tokens
provisioned from a secret manager (``token create --value-from-env`` / ``--value-from-stdin``).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import make_url, select

from pclease_service import tokens
from pclease_service.db.engine import create_db_engine
from pclease_service.db.schema import tokens as tokens_table
from tests.conftest import PG_ADMIN_DSN
from tests.live import PCLEASE, LiveServer, write_config


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database nobody has migrated yet."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pclease.db'}"
        return
    name = f"pclease_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _config(tmp_path: Path, database_url: str) -> Path:
    return write_config(
        tmp_path / "pclease.toml",
        {"data_dir": str(tmp_path / "data"), "backend": "memory", "database_url": database_url},
        {"small": {"cpus": 1, "memory_gb": 1}},
    )


def _pclease(
    cfg: Path, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PCLEASE, *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        input=stdin,
    )


def _stored_hashes(database_url: str) -> dict[str, str]:
    engine = create_db_engine(database_url, pool_size=1)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(tokens_table.c.name, tokens_table.c.token_hash)).all()
    finally:
        engine.dispose()
    return {row.name: row.token_hash for row in rows}


def test_serve_no_migrate_refuses_an_unmigrated_database_then_serves(
    tmp_path: Path, empty_database_url: str
) -> None:
    cfg = _config(tmp_path, empty_database_url)
    server = LiveServer(cfg, tmp_path / "serve.log", serve_args=("--no-migrate",))
    refused = subprocess.run(
        [*PCLEASE, "serve", "--no-migrate", "--config", str(cfg), "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1, refused.stderr
    assert "not at the current schema" in refused.stderr
    assert "pclease db upgrade" in refused.stderr
    assert "Traceback" not in refused.stderr
    # Nothing was created behind the operator's back: still no schema.
    assert _pclease(cfg, "status").returncode == 1

    assert _pclease(cfg, "db", "upgrade").returncode == 0
    value = secrets.token_urlsafe(32)
    created = _pclease(
        cfg,
        "token",
        "create",
        "airflow",
        "--scope",
        "lease",
        "--value-from-env",
        "PCLEASE_TEST_TOKEN",
        env={"PCLEASE_TEST_TOKEN": value},
    )
    assert created.returncode == 0, created.stderr

    server.start()
    try:
        ok = httpx.get(
            f"{server.url}/v1/leases", headers={"Authorization": f"Bearer {value}"}, timeout=10
        )
        assert ok.status_code == 200, ok.text
        wrong = httpx.get(
            f"{server.url}/v1/leases", headers={"Authorization": "Bearer " + "x" * 40}, timeout=10
        )
        assert wrong.status_code == 401
    finally:
        server.stop()
    assert value not in server.log()
    assert "pclease ready" in server.log()


def test_serve_no_migrate_says_when_the_database_cannot_be_reached(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "postgresql+psycopg://nobody:hunter2hunter2@127.0.0.1:1/none")
    result = _pclease(cfg, "serve", "--no-migrate", "--port", "0")
    assert result.returncode == 1
    assert "cannot reach the database" in result.stderr
    assert "hunter2hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("source", ["env", "stdin"])
def test_provisioned_token_is_validated_stored_as_a_hash_and_never_printed(
    tmp_path: Path, database_url: str, source: str
) -> None:
    cfg = _config(tmp_path, database_url)
    assert _pclease(cfg, "db", "upgrade").returncode == 0
    value = "pcl-" + secrets.token_urlsafe(40)

    def create(name: str, token_value: str, *scopes: str) -> subprocess.CompletedProcess[str]:
        args = ["token", "create", name, *(a for s in scopes for a in ("--scope", s))]
        if source == "env":
            return _pclease(
                cfg, *args, "--value-from-env", "AIRFLOW_TOKEN", env={"AIRFLOW_TOKEN": token_value}
            )
        return _pclease(cfg, *args, "--value-from-stdin", stdin=token_value + "\n")

    created = create("airflow", value, "lease")
    assert created.returncode == 0, created.stderr
    assert value not in created.stdout + created.stderr
    assert created.stdout == ""
    assert "not printed" in created.stderr
    assert _stored_hashes(database_url)["airflow"] == tokens.hash_token(value)
    if make_url(database_url).get_backend_name() == "sqlite":
        db_file = make_url(database_url).database
        assert db_file is not None
        assert value.encode() not in Path(db_file).read_bytes()

    # A deployment job runs it again on every rollout: same value and scopes is a no-op.
    again = create("airflow", value, "lease")
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stderr
    assert value not in again.stdout + again.stderr

    changed_scope = create("airflow", value, "admin")
    assert changed_scope.returncode == 1
    assert "exists; revoke it" in changed_scope.stderr
    reused = create("another", value, "lease")
    assert reused.returncode == 1
    assert "another token already has this value" in reused.stderr
    assert value not in changed_scope.stderr + reused.stderr
    assert set(_stored_hashes(database_url)) == {"airflow"}

    listed = _pclease(cfg, "token", "list")
    assert listed.returncode == 0
    assert value not in listed.stdout


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("tooshort-1234", "has 13 characters; it needs 32 to 512"),
        ("x" * 513, "has 513 characters"),
        ("secret with spaces inside, abcdefghijk", "may only contain letters"),
        ('quote"inside' + "abcdefghijklmnopqrstuvwxyz", "position 6"),
        ("=leading-padding-is-no-good-abcdefghij", "position 1"),
        ("changeme" * 5, "looks like a placeholder"),
    ],
)
def test_provisioned_token_values_are_checked_without_echoing_them(
    tmp_path: Path, bad: str, says: str
) -> None:
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'pclease.db'}")
    assert _pclease(cfg, "db", "upgrade").returncode == 0
    result = _pclease(
        cfg,
        "token",
        "create",
        "airflow",
        "--scope",
        "lease",
        "--value-from-env",
        "PCLEASE_TOKEN_VALUE",
        env={"PCLEASE_TOKEN_VALUE": bad},
    )
    assert result.returncode == 2, result.stderr
    assert says in result.stderr
    assert bad not in result.stderr and bad[:12] not in result.stderr
    assert _stored_hashes(f"sqlite:///{tmp_path / 'pclease.db'}") == {}


def test_token_value_options_are_clear_about_misuse(tmp_path: Path) -> None:
    cfg = _config(tmp_path, f"sqlite:///{tmp_path / 'pclease.db'}")
    assert _pclease(cfg, "db", "upgrade").returncode == 0
    unset = _pclease(
        cfg, "token", "create", "a", "--scope", "lease", "--value-from-env", "PCLEASE_NOPE_UNSET"
    )
    assert unset.returncode == 2
    assert "PCLEASE_NOPE_UNSET is not set or empty" in unset.stderr
    both = _pclease(
        cfg,
        "token",
        "create",
        "a",
        "--scope",
        "lease",
        "--value-from-env",
        "HOME",
        "--value-from-stdin",
        stdin="x\n",
    )
    assert both.returncode == 2
    assert "not both" in both.stderr
    empty_stdin = _pclease(
        cfg, "token", "create", "a", "--scope", "lease", "--value-from-stdin", stdin=""
    )
    assert empty_stdin.returncode == 2
    assert "has 0 characters" in empty_stdin.stderr
    assert _stored_hashes(f"sqlite:///{tmp_path / 'pclease.db'}") == {}
