"""A real Airflow 3 installation for end-to-end tests: its own ``AIRFLOW_HOME`` with a
SQLite metastore migrated by ``airflow db migrate``, a ``pclease`` connection added with
``airflow connections add``, and DAG runs through ``dag.test()`` in a subprocess (see
``examples/run_dag.py``).

The Airflow processes get an environment with nothing of the service's: no ``PCLEASE_*``
and no ``POLARS_CLOUD_*`` variable, as on a real Airflow worker.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

ROOT = Path(__file__).resolve().parent.parent
RUN_DAG = ROOT / "examples" / "run_dag.py"
AIRFLOW = [sys.executable, "-m", "airflow"]


@dataclass
class DagRunResult:
    state: str
    run_id: str
    tasks: dict[str, str]
    output: str  # stdout and stderr of the run: the task logs of dag.test()

    def __str__(self) -> str:
        return f"run {self.run_id}: {self.state} {self.tasks}"


class AirflowEnv:
    def __init__(self, home: Path, dags_folder: Path, **extra_env: str) -> None:
        self.home = home
        self.dags_folder = dags_folder
        home.mkdir(parents=True, exist_ok=True)
        self.database = home / "airflow.db"
        self.last_output = ""  # every run's output so far
        base = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PCLEASE_", "POLARS_CLOUD_", "AIRFLOW"))
        }
        self.env = {
            **base,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{self.database}",
            # Connection passwords are encrypted at rest, as in any real deployment.
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "PYTHONWARNINGS": "ignore",
            **extra_env,
        }

    def run(self, *args: str, timeout_s: float = 120) -> str:
        result = subprocess.run(
            [*AIRFLOW, *args], env=self.env, capture_output=True, text=True, timeout=timeout_s
        )
        if result.returncode != 0:
            raise AssertionError(f"airflow {args[0]} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    def migrate(self) -> AirflowEnv:
        self.run("db", "migrate")
        return self

    def add_pclease_connection(self, conn_id: str, url: str, token: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.run(
            "connections",
            "add",
            conn_id,
            "--conn-type",
            "pclease",
            "--conn-host",
            host,
            "--conn-port",
            port,
            "--conn-password",
            token,
        )

    def run_dag(
        self, dag_file: Path, dag_id: str, *, conf: dict[str, Any] | None = None
    ) -> DagRunResult:
        result = subprocess.run(
            [sys.executable, str(RUN_DAG), str(dag_file), dag_id, "--conf", json.dumps(conf or {})],
            # dag.test() serializes the DAG from the DAGs folder that holds its file.
            env={**self.env, "AIRFLOW__CORE__DAGS_FOLDER": str(dag_file.parent)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = result.stdout + result.stderr
        self.last_output += output
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode not in (0, 1) or not lines:
            raise AssertionError(f"running {dag_id} broke (exit {result.returncode}):\n{output}")
        summary = json.loads(lines[-1])
        return DagRunResult(summary["state"], summary["run_id"], summary["tasks"], output)

    def dump_metastore(self) -> str:
        """Every row of every table of the metastore, as text (blobs decoded leniently)."""
        parts = []
        with sqlite3.connect(self.database) as db:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
            for table in tables:
                for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608 (names from sqlite)
                    parts.append(table + ": " + " | ".join(_text(v) for v in row))
        return "\n".join(parts)

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str) -> Any:
        with sqlite3.connect(self.database) as db:
            row = db.execute(
                "SELECT value FROM xcom WHERE dag_id=? AND run_id=? AND task_id=? AND key=?",
                (dag_id, run_id, task_id, key),
            ).fetchone()
        if row is None:
            return None
        value = row[0]
        return json.loads(value.decode() if isinstance(value, bytes) else value)

    def logs(self) -> str:
        """Every file Airflow wrote under its home, except the metastore itself."""
        texts = []
        for path in sorted(self.home.rglob("*")):
            if path.is_file() and not path.name.startswith("airflow.db"):
                texts.append(path.read_text(errors="replace"))
        return "\n".join(texts)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)
