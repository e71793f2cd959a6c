"""deploy/systemd/pclease.service: the command lines are ones pclease accepts, ExecReload
sends SIGHUP (run here against a real ``pclease serve``), and a stop waits long enough."""

from __future__ import annotations

import configparser
import shlex
import signal
import subprocess
import time
from pathlib import Path

from devkit.live import LiveServer, write_config
from pclease_service.config import Settings, load_settings
from tests.deploy.deploy_support import DEPLOY, parse_cli, replica_stop_s, settings_field_for_env

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
    environment = dict(item.split("=", 1) for item in shlex.split(service["Environment"]))
    assert set(environment) == {"PCLEASE_CONFIG", "PCLEASE_REPLICA_ID"}
    assert all(settings_field_for_env(name) for name in environment if name != "PCLEASE_CONFIG")
    # %H, the host name: distinct per machine, valid as a replica id (and with -N appended).
    assert environment["PCLEASE_REPLICA_ID"] == "%H"
    assert Settings(replica_id="airflow-vm-3.example.com-2").replica_id
    assert service["KillSignal"] == "SIGTERM"
    # SIGTERM to pclease only (it drains; with --workers it passes the signal on).
    assert service["KillMode"] == "mixed"
    # The unit runs with the defaults unless pclease.toml changes them: either backend.
    timeout_s = int(service["TimeoutStopSec"])
    for settings in (Settings(), Settings(backend="polars_cloud", polars_cloud={"workspace": "w"})):
        budget_s = replica_stop_s(settings)
        assert timeout_s > budget_s, (settings.backend, budget_s)
        assert f"{budget_s:g} s {settings.backend.value}" in UNIT.read_text(), (
            "the unit's comment must state the real bound"
        )
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
        # The replica states the stop bound the unit's TimeoutStopSec is checked against.
        budget_s = replica_stop_s(load_settings(config))
        assert f"drains and exits within {budget_s:g} s" in server.log()
    finally:
        server.stop()
    # After a graceful stop uvicorn re-raises SIGTERM: systemd counts that as a clean exit.
    assert server.proc.returncode == -signal.SIGTERM
    assert "Application shutdown complete" in server.log()
