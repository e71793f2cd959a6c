"""The pclease command as an operator uses it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from devkit.live import PCLEASE, write_config


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PCLEASE, *args], capture_output=True, text=True, timeout=60)


def config(tmp_path: Path, **settings: object) -> Path:
    return write_config(
        tmp_path / "pclease.toml",
        {"data_dir": str(tmp_path / "data"), "backend": "memory", **settings},
        {"small": {"cpus": 1, "memory_gb": 1, "hourly_cost": 0.25}},
    )


def test_tokens_are_shown_once_and_stored_as_hashes(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert run("db", "upgrade", "--config", str(cfg)).returncode == 0
    created = run("token", "create", "airflow", "--scope", "lease", "--config", str(cfg))
    assert created.returncode == 0, created.stderr
    value = created.stdout.strip()
    assert value.startswith("pcl_") and len(value) > 40
    assert "not shown again" in created.stderr

    listed = run("token", "list", "--config", str(cfg))
    assert "airflow" in listed.stdout and "lease" in listed.stdout
    assert value not in listed.stdout
    assert value.encode() not in (tmp_path / "data" / "pclease.db").read_bytes()

    duplicate = run("token", "create", "airflow", "--scope", "read", "--config", str(cfg))
    assert duplicate.returncode == 1
    assert "exists" in duplicate.stderr

    assert run("token", "revoke", "airflow", "--config", str(cfg)).returncode == 0
    assert "revoked" in run("token", "list", "--config", str(cfg)).stdout
    again = run("token", "revoke", "airflow", "--config", str(cfg))
    assert again.returncode == 1
    assert "no active token" in again.stderr


def test_bad_scope_and_unmigrated_database_are_clear_errors(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    unmigrated = run("token", "create", "x", "--scope", "lease", "--config", str(cfg))
    assert unmigrated.returncode == 1
    assert "pclease db upgrade" in unmigrated.stderr
    bad = run("token", "create", "x", "--scope", "root", "--config", str(cfg))
    assert bad.returncode == 2
    assert "'root' is not one of" in bad.stderr
    assert "Traceback" not in unmigrated.stderr + bad.stderr


def test_profiles_validates_the_config(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    good = run("profiles", "--config", str(cfg))
    assert good.returncode == 0
    assert "small" in good.stdout and "1 cpu, 1 GB" in good.stdout

    broken = write_config(
        tmp_path / "broken.toml", {"backend": "nope"}, {"small": {"cpus": -1, "memory_gb": 1}}
    )
    result = run("profiles", "--config", str(broken))
    assert result.returncode == 1
    assert "backend:" in result.stderr and "profiles.small.cpus:" in result.stderr
    assert "Traceback" not in result.stderr


def test_status_says_what_is_running(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    run("db", "upgrade", "--config", str(cfg))
    result = run("status", "--config", str(cfg))
    assert result.returncode == 0
    assert "nothing is running" in result.stdout
