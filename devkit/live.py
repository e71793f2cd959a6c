"""A real ``pclease serve`` process (uvicorn) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

PCLEASE = [sys.executable, "-m", "pclease_service"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, settings: dict[str, Any], profiles: dict[str, dict[str, Any]]) -> Path:
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    for name, profile in profiles.items():
        lines.append(f"\n[profiles.{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in profile.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(config: Path, *args: str, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [*PCLEASE, *args, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if result.returncode != 0:
        raise AssertionError(f"pclease {' '.join(args)} failed:\n{result.stderr}")
    return result.stdout


class LiveServer:
    def __init__(
        self,
        config: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        serve_args: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.serve_args = serve_args
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def start(self, timeout_s: float = 30.0) -> LiveServer:
        self.launch()
        return self.wait_ready(timeout_s)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> None:
        """Start the process without waiting for it (see :meth:`wait_ready`)."""
        self._close_log()
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *PCLEASE,
                "serve",
                "--config",
                str(self.config),
                "--port",
                str(self.port),
                *self.serve_args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

    def wait_ready(self, timeout_s: float = 30.0) -> LiveServer:
        """Wait until the launched process answers ``/readyz`` with 200."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_path.read_text()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server did not become ready:\n{self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close_log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Pclease:
    """A live pclease for the Airflow tests: a lease token for Airflow, an admin token
    for the tests, and the directories its profiles may read and write."""

    server: LiveServer
    token: str
    admin: str
    lake: Path
    exchange: Path
    cloud_secret: str

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(
            self.server.url + path,
            params=params,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str) -> Any:
        response = httpx.post(
            self.server.url + path, headers={"Authorization": f"Bearer {self.admin}"}, timeout=30
        )
        assert response.status_code == 200, response.text
        return response.json()

    def leases(self, dag_id: str, run_id: str | None = None) -> list[dict[str, Any]]:
        params = {"dag_id": dag_id} | ({"run_id": run_id} if run_id else {})
        return list(self.get("/v1/leases", **params)["leases"])

    def lease(self, lease_id: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/leases/{lease_id}"))

    def context(self, context_id: str) -> dict[str, Any]:
        return dict(self.get(f"/v1/contexts/{context_id}"))

    def queries(self, lease_id: str) -> list[dict[str, Any]]:
        return list(self.get(f"/v1/leases/{lease_id}/queries")["queries"])

    def events(self, **params: Any) -> list[dict[str, Any]]:
        return list(self.get("/v1/events", limit=5000, **params)["events"])

    def release_reasons(self, lease_id: str) -> list[str]:
        return [e["reason"] for e in self.events(lease_id=lease_id) if e["to_state"] == "released"]


def start_pclease(
    tmp: Path,
    *,
    backend: dict[str, Any],
    env: dict[str, str],
    profile: dict[str, Any],
    grace_s: float = 3,
) -> Pclease:
    """A live pclease with profiles small, large and shared, holding a Polars Cloud secret
    (``env`` has it as ``POLARS_CLOUD_CLIENT_SECRET``)."""
    lake, exchange = tmp / "lake", tmp / "exchange"
    lake.mkdir(parents=True)
    exchange.mkdir()
    shape = {"idle_grace_s": grace_s, "data_roots": [str(lake), str(exchange)], **profile}
    config = write_config(
        tmp / "pclease.toml",
        {
            "data_dir": str(tmp / "svc"),
            "database_url": f"sqlite:///{tmp / 'svc.db'}",
            "reconcile_interval_s": 0.2,
            "lease_ttl_s": 20,
            **backend,
        },
        {
            "small": {"cpus": 1, "memory_gb": 1, "hourly_cost": 0.4, **shape},
            "large": {"cpus": 2, "memory_gb": 2, "hourly_cost": 1.6, **shape},
            "shared": {"cpus": 1, "memory_gb": 1, "hourly_cost": 0.4, **shape},
        },
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLARS_CLOUD_")} | env
    run_cli(config, "db", "upgrade", env=env)
    token = run_cli(config, "token", "create", "airflow", "--scope", "lease", env=env).strip()
    admin = run_cli(config, "token", "create", "ops", "--scope", "admin", env=env).strip()
    server = LiveServer(config, tmp / "server.log", env=env).start()
    return Pclease(server, token, admin, lake, exchange, env["POLARS_CLOUD_CLIENT_SECRET"])


def wait_for(predicate: Any, timeout_s: float = 30, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something true; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
