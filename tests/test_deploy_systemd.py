"""deploy/systemd/pclease.service: the command lines are ones pclease accepts, ExecReload
sends SIGHUP (run here against a real ``pclease serve``), and a stop waits long enough."""

from __future__ import annotations

import configparser
import shlex
import signal
import subprocess
import time
from pathlib import Path

from pclease_service.config import Settings
from tests.deploy_support import DEPLOY, longest_held_request_s, parse_cli
from tests.live import LiveServer, write_config

UNIT = DEPLOY / "systemd" / "pclease.service"


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_runs_serve_and_waits_for_held_requests_on_stop() -> None:
    service = _unit()["Service"]
    start = shlex.split(service["ExecStart"])
    assert start[0].endswith("/pclease")
    command, params = parse_cli(start[1:])
    assert command == "serve"
    assert params["host"] == "127.0.0.1", "behind a reverse proxy or on one machine with Airflow"
    assert service["Environment"].startswith("PCLEASE_CONFIG=")
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed", "pclease stops its own worker processes"
    # The unit runs with the defaults unless pclease.toml lowers them.
    assert int(service["TimeoutStopSec"]) > longest_held_request_s(Settings())
    assert service["User"] != "root"
    assert service["StateDirectory"] == "pclease"


def test_exec_reload_sends_sighup_and_the_service_keeps_running(tmp_path: Path) -> None:
    reload = shlex.split(_unit()["Service"]["ExecReload"])
    assert reload[:2] == ["/bin/kill", "-HUP"] and reload[2] == "$MAINPID"
    config = write_config(
        tmp_path / "pclease.toml",
        {"data_dir": str(tmp_path / "data"), "backend": "memory"},
        {"small": {"cpus": 1, "memory_gb": 1}},
    )
    server = LiveServer(config, tmp_path / "serve.log").start()
    try:
        assert server.proc is not None
        argv = [str(server.proc.pid) if a == "$MAINPID" else a for a in reload]
        subprocess.run(argv, check=True, timeout=30)
        deadline = time.monotonic() + 20
        while "SIGHUP" not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        assert server.proc.poll() is None, "SIGHUP must not end the service"
    finally:
        server.stop()
    # After a graceful stop uvicorn re-raises SIGTERM: systemd counts that as a clean exit.
    assert server.proc.returncode == -signal.SIGTERM
    assert "Application shutdown complete" in server.log()
