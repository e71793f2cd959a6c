"""How ``pclease serve`` runs: one replica in this process, or N replica processes on one
port (``--workers N``).

One replica is uvicorn serving the app, with one change to its signal handling: the first
SIGTERM (or SIGINT) makes the replica drain at once (``Service.begin_drain``: 503
``draining`` with ``Connection: close``, long-polls and waiting lease requests end, /readyz
fails) for ``drain_notice_s``; then uvicorn stops as usual (it closes its listener and
waits for the requests in flight) and the lifespan's ``Service.stop`` finishes the drain.
A second signal stops at once. :func:`stop_budget_s` is how long all that can take, the
figure a deployment's stop timeout must exceed.

With ``--workers N`` this process only supervises: it migrates the database once, then
runs N ``pclease serve`` processes, each its own replica (its own ``replica_id``: the
configured one with ``-1`` ... ``-N`` appended, or a generated one), all listening on the
same port (``SO_REUSEPORT``: the kernel spreads new connections over them). A worker that
dies is started again; SIGTERM, SIGINT and SIGHUP are passed on to every worker, and the
supervisor exits once they all have.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from pclease_service.backends.base import Capabilities
from pclease_service.config import Settings
from pclease_service.runtime import Service

log = logging.getLogger("pclease")

REPLICA_ID_ENV = "PCLEASE_REPLICA_ID"
# A worker that keeps dying is started again no faster than this.
_RESTART_BACKOFF_S = 2.0
# The database writes of a replica's last moments (its row, its claims), with room to spare.
_STOP_WRITES_S = 5.0


def graceful_requests_s(settings: Settings) -> int:
    """How long uvicorn waits for the requests in flight once the port is closed (a
    result download, a plan upload; long-polls and waiting lease requests end when the
    drain begins), then cancels them."""
    return max(1, int(settings.drain_timeout_s))


def stop_budget_s(settings: Settings, capabilities: Capabilities) -> float:
    """The longest one replica takes from SIGTERM to exit: ``drain_notice_s`` of
    answering 503, then the requests in flight (:func:`graceful_requests_s`), then its
    queries (``drain_timeout_s``, then cancelled) while its backend calls in flight finish
    (``backend_call_timeout_s`` each), then, under ``pclease shutdown`` and for a backend
    that stops its contexts with the service, the stops of the contexts it holds (one more
    backend call, in parallel), and its last database writes.

    A deployment's stop timeout (``terminationGracePeriodSeconds``, ``stop_grace_period``,
    ``TimeoutStopSec``) must exceed this plus any ``preStop`` delay; a replica killed
    earlier loses nothing either, but its contexts and queries wait ``replica_ttl_s`` for
    another replica instead of being handed over at once."""
    queries_and_calls_s = max(settings.drain_timeout_s, settings.backend_call_timeout_s)
    shutdown_stops_s = settings.backend_call_timeout_s if capabilities.stop_on_shutdown else 0.0
    return (
        settings.drain_notice_s
        + graceful_requests_s(settings)
        + queries_and_calls_s
        + shutdown_stops_s
        + _STOP_WRITES_S
    )


class _DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        notice_s = self.service.settings.drain_notice_s
        if self._signalled or notice_s <= 0:
            super().handle_exit(sig, frame)  # a second signal: stop now
            return
        self._signalled = True
        self.service.request_drain()
        # Keep answering (503 draining, Connection: close) for a moment, so that clients
        # drop their kept-alive connections to this replica on an answer rather than on
        # a connection closed under a request, and the balancer sees /readyz fail.
        timer = threading.Timer(notice_s, super().handle_exit, args=(sig, frame))
        timer.daemon = True
        timer.start()


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


#: No access log (its cost showed in profiles; requests are counted on /metrics) and no
#: logging setup of uvicorn's own: its loggers propagate to the handler ``logs.configure``
#: set up. The benchmark's ceiling app runs with the same options.
UVICORN_OPTIONS: dict[str, Any] = {"access_log": False, "log_config": None}


def run_replica(
    app: Any, service: Service, *, host: str, port: int, log_level: str, reuse_port: bool
) -> None:
    """Serve ``app`` until SIGTERM; the replica drains from the signal on."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        **UVICORN_OPTIONS,
        timeout_graceful_shutdown=graceful_requests_s(service.settings),
    )
    server = _DrainingServer(config, service)
    log.info(
        "on SIGTERM this replica drains and exits within %g s (stop timeouts must be longer)",
        stop_budget_s(service.settings, service.backend.capabilities),
    )
    sockets = [reuse_port_socket(host, port)] if reuse_port else None
    server.run(sockets=sockets)


def supervise(argv: Sequence[str], workers: int, replica_id: str | None) -> int:
    """Run ``argv`` (a ``pclease serve`` command line for one replica) ``workers`` times
    and keep them running until a signal ends them all; returns the exit code."""
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False

    def launch(i: int) -> None:
        env = dict(os.environ)
        if replica_id:
            env[REPLICA_ID_ENV] = f"{replica_id}-{i + 1}"
        else:
            env.pop(REPLICA_ID_ENV, None)
        procs[i] = subprocess.Popen(list(argv), env=env)
        log.info("started worker %d (pid %d)", i + 1, procs[i].pid)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for i in range(workers):
        launch(i)
    started = {i: time.monotonic() for i in procs}
    while True:
        time.sleep(0.2)
        running = [p for p in procs.values() if p.poll() is None]
        if stopping:
            if not running:
                return 0
            continue
        for i, proc in list(procs.items()):
            if proc.poll() is not None and time.monotonic() - started[i] >= _RESTART_BACKOFF_S:
                log.warning("worker %d exited with %s; starting it again", i + 1, proc.returncode)
                launch(i)
                started[i] = time.monotonic()


def worker_argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pclease_service", *args]
