"""deploy/compose/pclease.compose.yaml joined with Airflow's docker-compose.yaml.

Airflow's file is not in the repository: ``tests/deploy/airflow-compose-standin.yaml``
stands in for the 3.3.2 release (its service names, anchors and mounts). The merge is
checked as Compose does it, against the Compose specification's schema, and against what
pclease and the Airflow provider really read."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from airflow.sdk import Connection

from airflow_plugin.hooks import settings_from_connection
from pclease_service.config import CONFIG_ENV_VAR
from tests.deploy.deploy_support import (
    COMPOSE_DIR,
    ROOT,
    MissingVariable,
    app_routes,
    compose_variables,
    interpolate,
    load_deployed_settings,
    merge_compose,
    parse_cli,
    replica_stop_s,
    settings_field_for_env,
)

OVERRIDE = COMPOSE_DIR / "pclease.compose.yaml"
STAND_IN = ROOT / "tests" / "deploy" / "airflow-compose-standin.yaml"
TOKEN = "tok-" + "abcdefghijklmnopqrstuvwxyz0123456789"
ENV = {
    "PCLEASE_DB_PASSWORD": "db-password-for-the-test",
    "POLARS_CLOUD_WORKSPACE": "data-platform",
    "PCLEASE_AIRFLOW_TOKEN": TOKEN,
}


def _env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE_DIR / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def _merged(env: dict[str, str] | None = None) -> dict[str, Any]:
    documents = [yaml.safe_load(path.read_text()) for path in (STAND_IN, OVERRIDE)]
    return interpolate(merge_compose(*documents), env if env is not None else ENV)


def _airflow_services(merged: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from Airflow's x-airflow-common (its image variable shows it)."""
    stand_in = yaml.safe_load(STAND_IN.read_text())
    names = {
        name
        for name, service in stand_in["services"].items()
        if str(service.get("image", "")).startswith("${AIRFLOW_IMAGE_NAME")
    }
    return {name: merged["services"][name] for name in names}


def _host_path(source: str) -> Path:
    return (COMPOSE_DIR / source).resolve() if not source.startswith("/") else Path(source)


def secret_readers(merged: dict[str, Any]) -> set[str]:
    """Services that can read the Polars Cloud service account: through compose secrets,
    a bind mount of the secret files or of any directory above them, or env files."""
    secret_files = {_host_path(s["file"]) for s in merged["secrets"].values() if "file" in s}
    readers = set()
    for name, service in merged["services"].items():
        if service.get("secrets"):
            readers.add(name)
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                host = _host_path(source)
                if any(f == host or host in f.parents for f in secret_files):
                    readers.add(name)
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            if any(_host_path(str(env_file)) in (f, *f.parents) for f in secret_files):
                readers.add(name)
    return readers


def test_both_files_and_the_merge_follow_the_compose_specification(tmp_path: Path) -> None:
    merged_file = tmp_path / "merged.yaml"
    merged_file.write_text(yaml.safe_dump(_merged()))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(OVERRIDE),
            str(STAND_IN),
            str(merged_file),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_variable_is_documented_or_has_a_default() -> None:
    documented = _env_example().keys() | {
        m.group(1)
        for m in re.finditer(r"^#\s*([A-Z_]+)=", (COMPOSE_DIR / ".env.example").read_text(), re.M)
    }
    for name, op in compose_variables(OVERRIDE.read_text()).items():
        if op in (":?", "?"):
            assert name in _env_example(), f"required variable {name} is not in .env.example"
        elif op is None:
            pytest.fail(f"${{{name}}} has no default and is not required: give it one")
        else:
            assert name in documented or name.startswith("AIRFLOW_"), name
    # What .env.example leaves empty must be filled in: compose refuses to start without it.
    with pytest.raises(MissingVariable, match="PCLEASE_DB_PASSWORD"):
        _merged({**_env_example(), **ENV, "PCLEASE_DB_PASSWORD": ""})


def test_it_joins_airflows_file_without_inventing_services() -> None:
    stand_in = yaml.safe_load(STAND_IN.read_text())["services"]
    override = yaml.safe_load(OVERRIDE.read_text())["services"]
    for name, service in override.items():
        assert name in stand_in or "image" in service, (
            f"{name} is neither a service of Airflow's file nor one of pclease's own"
        )
    merged = _merged()
    airflow = _airflow_services(merged)
    assert set(airflow) == {n for n in override if n in stand_in}, (
        "every service Airflow builds from x-airflow-common needs the connection, no other"
    )
    worker = merged["services"]["airflow-worker"]
    assert worker["environment"]["DUMB_INIT_SETSID"] == "0", "Airflow's own env must survive"
    assert worker["command"] == "celery worker"


def test_every_airflow_container_gets_a_pclease_connection_that_works() -> None:
    merged = _merged()
    pclease = merged["services"]["pclease"]
    command, params = parse_cli(pclease["command"])
    assert command == "serve"
    for name, service in _airflow_services(merged).items():
        value = service["environment"]["AIRFLOW_CONN_PCLEASE_DEFAULT"]
        conn = Connection.from_json(value, conn_id="pclease_default")
        assert conn.conn_type == "pclease"
        assert conn.password == TOKEN, name
        settings = settings_from_connection(conn)
        assert settings.base_url == f"http://pclease:{params['port']}", name
        assert conn.host in merged["services"]
        assert str(service["image"]).startswith("pclease-airflow:"), name
        assert service["build"]["target"] == "airflow"


def test_pclease_services_run_commands_pclease_has_with_settings_it_reads(
    tmp_path: Path,
) -> None:
    merged = _merged()
    services = merged["services"]
    toml_text = (COMPOSE_DIR / "pclease.toml").read_text()
    expected = {
        "pclease-migrate": "db upgrade",
        "pclease-token": "token create",
        "pclease": "serve",
    }
    for name, command_name in expected.items():
        service = services[name]
        command, params = parse_cli(service["command"])
        assert command == command_name
        env = {k: str(v) for k, v in service["environment"].items()}
        config = env.pop(CONFIG_ENV_VAR)
        mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
        assert _host_path(mounts[config]) == COMPOSE_DIR / "pclease.toml"
        if command == "token create":
            assert env.pop(params["value_env"]) == TOKEN
            assert params["scopes"] == ("lease",)
        for key in env:
            assert settings_field_for_env(key), f"{name}: {key} is not a setting"
        settings = load_deployed_settings(toml_text, env, tmp_path)
        assert settings.database_url is not None
        assert settings.database_url.startswith("postgresql+psycopg://pclease:")
        assert "@pclease-postgres:5432/" in settings.database_url
        assert settings.polars_cloud.workspace == ENV["POLARS_CLOUD_WORKSPACE"]

    serve = services["pclease"]
    _, params = parse_cli(serve["command"])
    assert params["no_migrate"] is True
    assert serve["depends_on"]["pclease-migrate"]["condition"] == "service_completed_successfully"
    assert services["pclease-token"]["depends_on"]["pclease-migrate"]["condition"] == (
        "service_completed_successfully"
    )
    assert [p.split(":")[-1] for p in serve["ports"]] == [str(params["port"])]
    settings = load_deployed_settings(
        toml_text, {k: str(v) for k, v in serve["environment"].items()}, tmp_path
    )
    data = [v for v in serve["volumes"] if v.split(":")[1] == str(settings.data_dir)]
    assert data and not data[0].split(":")[0].startswith("."), "data_dir is a named volume"
    assert data[0].split(":")[0] in merged["volumes"]
    credentials = settings.polars_cloud.credentials
    assert credentials.source.value == "file"
    mounted = {f"/run/secrets/{name}" for name in serve["secrets"]}
    assert {str(credentials.client_id_file), str(credentials.client_secret_file)} == mounted
    grace_s = int(serve["stop_grace_period"].removesuffix("s"))
    assert grace_s > replica_stop_s(settings), (
        "stop_grace_period must outlast what a replica does between SIGTERM and its exit "
        "(pclease_service.serving.stop_budget_s)"
    )
    assert f"stop_grace_period ({grace_s} s)" in toml_text, "the TOML names the grace period"
    assert "/healthz" in app_routes()


def test_the_pclease_container_runs_replicas_that_share_what_they_must(tmp_path: Path) -> None:
    merged = _merged()
    serve = merged["services"]["pclease"]
    _, params = parse_cli(serve["command"])
    assert params["workers"] >= 2, "compose runs replicas as --workers in one container"
    assert "deploy" not in serve and "scale" not in serve, (
        "one container: several would need a replica id each, and one host port"
    )
    env = {k: str(v) for k, v in serve["environment"].items()}
    settings = load_deployed_settings((COMPOSE_DIR / "pclease.toml").read_text(), env, tmp_path)
    # Each worker is named from it (pclease-1, pclease-2), the same after every restart.
    assert settings.replica_id == "pclease"
    # --workers needs PostgreSQL; the replicas of one container share data_dir (a named
    # volume), so a local storage directory under it is shared too.
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql")
    assert settings.storage.kind.value in {"local", "database", "s3"}
    if settings.storage.kind.value == "local":
        assert settings.storage.directory is None or settings.storage.directory.is_relative_to(
            settings.data_dir
        )


def test_only_files_and_images_that_exist_are_referenced() -> None:
    merged = _merged()
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, re.M | re.I))
    for name, service in merged["services"].items():
        if "build" in service:
            assert _host_path(service["build"]["context"]) == ROOT, name
            assert service["build"]["target"] in stages, name
        else:
            image = str(service["image"])
            assert re.fullmatch(r"[a-z0-9./-]+:[A-Za-z0-9._-]+", image), f"{name}: pin {image}"
            assert not image.endswith(":latest")
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                if name in _airflow_services(merged):
                    continue  # Airflow's own dags/, logs/...: created by Airflow's init
                assert _host_path(source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in merged["volumes"], f"{name}: volume {source} is not declared"
    for secret in merged["secrets"].values():
        path = _host_path(secret["file"])
        assert path.parent == COMPOSE_DIR / "secrets"
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(path)], cwd=ROOT, timeout=30, check=False
        )
        assert ignored.returncode == 0, f"{path} must be git-ignored: it holds the secret"


def test_no_airflow_container_can_read_the_polars_cloud_secret() -> None:
    merged = _merged()
    assert secret_readers(merged) == {"pclease"}
    for service in merged["services"].values():
        for value in (service.get("environment") or {}).values():
            assert "polars_cloud_client" not in str(value)


@pytest.mark.parametrize(
    "leak",
    [
        lambda s: s["airflow-worker"].update(secrets=["polars_cloud_client_secret"]),
        lambda s: s["airflow-scheduler"]["volumes"].append("./secrets:/opt/airflow/secrets:ro"),
        lambda s: s["airflow-apiserver"]["volumes"].append(".:/opt/airflow/project:ro"),
        lambda s: s["airflow-triggerer"].update(env_file=["./secrets/polars_cloud_client_id"]),
    ],
)
def test_the_secret_check_notices_a_leak(leak: Any) -> None:
    merged = copy.deepcopy(_merged())
    leak(merged["services"])
    assert secret_readers(merged) != {"pclease"}


def test_compose_and_env_example_are_consistent_with_the_token_rules() -> None:
    # .env.example tells people how to make a token; the value pclease accepts is checked
    # where it enters (token create), and the connection JSON needs no escaping for it.
    from pclease_service import principals

    assert principals.check_provided(TOKEN) == TOKEN
    text = (COMPOSE_DIR / ".env.example").read_text()
    assert "token_urlsafe(32)" in text
    value = _airflow_services(_merged())["airflow-worker"]["environment"][
        "AIRFLOW_CONN_PCLEASE_DEFAULT"
    ]
    assert json.loads(value)["password"] == TOKEN
