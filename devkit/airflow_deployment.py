"""A real Airflow 3 deployment on this machine, as separate processes: ``airflow
scheduler`` (LocalExecutor), ``airflow dag-processor``, ``airflow api-server`` and
``airflow triggerer`` (where deferred tasks wait), on a PostgreSQL metastore database
created for it (a random name) and dropped when it stops.

The tests, ``scripts/demo`` and ``bench/`` drive it through Airflow's REST API, as a user
would::

    with AirflowDeployment(home, dags_folder).start() as airflow:
        airflow.add_connection("pclease_default", "pclease", host=..., port=..., password=...)
        run = airflow.run_dag("pclease_seed_pipeline")

The processes get an environment with nothing of the pclease service's in it: no
``PCLEASE_*`` and no ``POLARS_CLOUD_*`` variable, as on a real Airflow machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

#: Where PostgreSQL answers, and a database to connect to for CREATE/DROP DATABASE.
PG_ADMIN_DSN = os.environ.get("PCLEASE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
AIRFLOW = [sys.executable, "-m", "airflow"]
TRIGGERER = ("triggerer", "--skip-serve-logs")
FINISHED = frozenset({"success", "failed"})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_database(prefix: str, admin_dsn: str = PG_ADMIN_DSN) -> str:
    """A new, empty PostgreSQL database with a random name; returns its SQLAlchemy URL."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_dsn.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}"


def drop_database(url: str, admin_dsn: str = PG_ADMIN_DSN) -> None:
    import psycopg

    name = url.rsplit("/", 1)[1]
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True)
class DagRun:
    dag_id: str
    run_id: str
    state: str
    tasks: dict[str, str]

    def __str__(self) -> str:
        return f"run {self.dag_id}/{self.run_id}: {self.state} {self.tasks}"


class AirflowDeployment:
    """Airflow's scheduler, DAG processor, API server and triggerer, started as processes."""

    def __init__(
        self,
        home: Path,
        dags_folder: Path,
        *,
        parallelism: int = 8,
        env: Mapping[str, str] | None = None,
        admin_dsn: str = PG_ADMIN_DSN,
    ) -> None:
        self.home = home
        self.dags_folder = dags_folder
        self.parallelism = parallelism
        self.admin_dsn = admin_dsn
        self.extra_env = dict(env or {})
        self.database_url: str | None = None
        self.port = 0
        self.url = ""
        self.env: dict[str, str] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._token: str | None = None
        self._http: httpx.Client | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout_s: float = 240.0) -> AirflowDeployment:
        """Create the metastore, migrate it, start the processes, and wait until the
        scheduler and the DAG processor report healthy."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.database_url = create_database("airflow", self.admin_dsn)
        try:
            self._start(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout_s: float) -> None:
        from cryptography.fernet import Fernet

        assert self.database_url is not None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        inherited = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PCLEASE_", "POLARS_CLOUD_", "AIRFLOW"))
        }
        self.env = {
            **inherited,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(self.parallelism),
            # Connection passwords are encrypted at rest, as in any real deployment.
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.database_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": self.database_url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API_AUTH__JWT_ISSUER": "pclease-dev",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
            "PYTHONWARNINGS": "ignore",
            **self.extra_env,
        }
        self.airflow("db", "migrate", timeout_s=timeout_s)
        self._spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port))
        self._spawn("scheduler", "scheduler", "--skip-serve-logs")
        self._spawn("dag-processor", "dag-processor")
        self._spawn("triggerer", *TRIGGERER)
        self._wait_healthy(("metadatabase", "scheduler", "dag_processor", "triggerer"), timeout_s)

    def _wait_healthy(self, parts: tuple[str, ...], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_processes()
            try:
                health = httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).json()
                if all((health.get(part) or {}).get("status") == "healthy" for part in parts):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Airflow did not become healthy within {timeout_s:g} s")
            time.sleep(0.5)

    def restart_triggerer(self, timeout_s: float = 120.0) -> float:
        """Stop the triggerer as a deploy does (SIGTERM, then wait for it to exit) and start
        a new one; returns when the new one was started (``time.time()``). Its log goes on
        in ``triggerer.log``."""
        process = self.processes.pop("triggerer")
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait(10)
        started = time.time()
        self._spawn("triggerer", *TRIGGERER)
        self._check_processes()
        return started

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.home / f"{name}.log").open("ab")
        try:
            self.processes[name] = subprocess.Popen(
                [*AIRFLOW, *args],
                env=self.env,
                cwd=self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: stop() ends the executor's workers and tasks too.
                start_new_session=True,
            )
        finally:
            log.close()

    def _check_processes(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"airflow {name} exited ({process.returncode}):\n{self.log_of(name)[-4000:]}"
                )

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL) and drop the metastore database."""
        if self._http is not None:
            self._http.close()
            self._http = None
        for process in self.processes.values():
            _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for process in self.processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(max(0.1, deadline - time.monotonic()))
            _signal_group(process, signal.SIGKILL)
            process.wait(10)
        self.processes.clear()
        if self.database_url is not None:
            drop_database(self.database_url, self.admin_dsn)
            self.database_url = None

    def __enter__(self) -> AirflowDeployment:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def scheduler_alive(self) -> bool:
        """The scheduler process runs and its latest heartbeat is recent."""
        process = self.processes.get("scheduler")
        if process is None or process.poll() is not None:
            return False
        health = self.api("GET", "/api/v2/monitor/health").json()
        return bool(health["scheduler"]["status"] == "healthy")

    # -- the CLI ----------------------------------------------------------------------------

    def airflow(self, *args: str, timeout_s: float = 120.0) -> str:
        result = subprocess.run(
            [*AIRFLOW, *args],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args[:2])} failed:\n{result.stderr[-4000:]}")
        return result.stdout

    def add_connection(
        self,
        conn_id: str,
        conn_type: str,
        *,
        host: str,
        port: int,
        password: str,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """``airflow connections add``: the connection is stored in the metastore."""
        args = [
            "connections",
            "add",
            conn_id,
            "--conn-type",
            conn_type,
            "--conn-host",
            host,
            "--conn-port",
            str(port),
            "--conn-password",
            password,
        ]
        if extra:
            args += ["--conn-extra", json.dumps(dict(extra))]
        self.airflow(*args)

    # -- the REST API -----------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One REST API call as an admin; raises on an error answer."""
        if self._http is None:
            token = httpx.get(f"{self.url}/auth/token", timeout=30)
            token.raise_for_status()
            self._http = httpx.Client(
                base_url=self.url,
                headers={"Authorization": f"Bearer {token.json()['access_token']}"},
                timeout=30,
            )
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:2000]}")
        return response

    def create_pool(self, name: str, slots: int) -> None:
        """A pool whose deferred tasks do not count against its slots (Airflow's default)."""
        body = {"name": name, "slots": slots, "include_deferred": False}
        self.api("POST", "/api/v2/pools", json=body)

    def wait_for_dags(self, *dag_ids: str, timeout_s: float = 120.0) -> None:
        """Wait until the DAG processor has parsed ``dag_ids``; fail on an import error."""
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_processes()
            errors = self.api("GET", "/api/v2/importErrors").json()["import_errors"]
            if errors:
                raise RuntimeError(f"DAG import errors: {json.dumps(errors, indent=1)[:4000]}")
            known = {dag["dag_id"] for dag in self.api("GET", "/api/v2/dags").json()["dags"]}
            if set(dag_ids) <= known:
                return
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(set(dag_ids) - known))
                raise RuntimeError(f"DAGs not parsed within {timeout_s:g} s: {missing}")
            time.sleep(1)

    def trigger(self, dag_id: str, conf: Mapping[str, Any] | None = None) -> str:
        body = {"logical_date": None, "conf": dict(conf or {})}
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body).json()
        return str(run["dag_run_id"])

    def dag_run(self, dag_id: str, run_id: str) -> DagRun:
        run = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}").json()
        tasks = {_ti_name(ti): str(ti["state"]) for ti in self.task_instances(dag_id, run_id)}
        return DagRun(dag_id, run_id, str(run["state"]), tasks)

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float = 180.0) -> DagRun:
        deadline = time.monotonic() + timeout_s
        while True:
            self._check_processes()
            run = self.dag_run(dag_id, run_id)
            if run.state in FINISHED:
                return run
            if time.monotonic() > deadline:
                raise RuntimeError(f"{run} did not finish within {timeout_s:g} s")
            time.sleep(0.5)

    def run_dag(
        self, dag_id: str, conf: Mapping[str, Any] | None = None, timeout_s: float = 180.0
    ) -> DagRun:
        return self.wait_for_run(dag_id, self.trigger(dag_id, conf), timeout_s)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances"
        return list(self.api("GET", path).json()["task_instances"])

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
        return dict(self.api("GET", path).json())

    def set_task_state(self, dag_id: str, run_id: str, task_id: str, state: str) -> None:
        """What "Mark as failed" (or success) in the UI does."""
        path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
        self.api("PATCH", path, json={"new_state": state})

    def xcom(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        key: str = "return_value",
        *,
        map_index: int = -1,
    ) -> Any:
        run = quote(run_id, safe="")
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run}/taskInstances/{task_id}/xcomEntries/{key}"
        params = {"deserialize": True, "map_index": map_index}
        return self.api("GET", path, params=params).json()["value"]

    # -- what it left behind ----------------------------------------------------------------

    def log_of(self, process: str) -> str:
        path = self.home / f"{process}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def task_log(self, dag_id: str, run_id: str, task_id: str) -> str:
        """Every attempt's log of one task (from the log files)."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
        return "\n".join(p.read_text(errors="replace") for p in sorted(folder.rglob("*.log")))

    def logs(self) -> str:
        """Every file Airflow wrote under its home."""
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.home.rglob("*")) if p.is_file()
        )

    def dump_metastore(self) -> str:
        """Every row of every table of the metastore, as text (blobs decoded leniently)."""
        import psycopg

        assert self.database_url is not None
        dsn = self.database_url.replace("postgresql+psycopg://", "postgresql://")
        parts = []
        with psycopg.connect(dsn) as conn:
            tables = conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            ).fetchall()
            for (table,) in tables:
                for row in conn.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 (catalog names)
                    parts.append(f"{table}: " + " | ".join(_text(value) for value in row))
        return "\n".join(parts)


def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _ti_name(ti: Mapping[str, Any]) -> str:
    index = ti.get("map_index", -1)
    return str(ti["task_id"]) if index is None or index < 0 else f"{ti['task_id']}[{index}]"


def _text(value: Any) -> str:
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)
