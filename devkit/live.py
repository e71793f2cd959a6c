"""A real ``pclease serve`` process (uvicorn) for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
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
