"""Several real ``pclease serve`` replicas on one PostgreSQL database, behind one port.

Each replica is a uvicorn process (:class:`~devkit.live.LiveServer`) started with the same
config file; the database is migrated once, before any of them starts. By default each has
a data directory of its own (``PCLEASE_DATA_DIR``), as if it ran on its own machine, and a
replica id of its own (``PCLEASE_REPLICA_ID``: ``r1``, ``r2``, ...). :class:`Balancer`
spreads connections over them round-robin on one port, skipping replicas that refuse
connections or whose ``/readyz`` fails, as a load balancer with readiness checks does::

    with ReplicaSet(tmp, database_url=create_database("pclease_rep"), profiles=...) as fleet:
        token = fleet.token("airflow", "lease")
        httpx.post(f"{fleet.url}/v1/leases", ...)   # through the balancer
        fleet.kill(0)                               # SIGKILL replica r1
        fleet.restart(0)

The balancer works per TCP connection (like kube-proxy or HAProxy in TCP mode), not per
request: a client that keeps its connection open keeps talking to one replica, and a new
connection goes to the next ready replica. It runs on an event loop in a thread of the
calling process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from devkit.live import LiveServer, free_port, run_cli, write_config

#: The environment variable each replica reads its id from.
REPLICA_ID_ENV = "PCLEASE_REPLICA_ID"
_CHUNK = 64 * 1024
# Like a Kubernetes readiness probe's failureThreshold: one slow answer is not a verdict.
_FAILURE_THRESHOLD = 2


class Balancer:
    """A round-robin TCP balancer on ``127.0.0.1`` (see the module docstring).

    ``targets`` is called for each new connection and returns the ports to try, in the
    order of the replicas; each connection goes to the next one in turn that is ready and
    accepts it. With ``probe_interval_s``, a replica whose ``/readyz`` does not answer 200
    is skipped (after two failed probes in a row) until it does again (unless no replica
    is ready: then all are tried).
    """

    def __init__(
        self, targets: Callable[[], list[int]], *, probe_interval_s: float | None = 0.5
    ) -> None:
        self.targets = targets
        self.probe_interval_s = probe_interval_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: How many connections each port was given (inspectable by tests).
        self.connections: dict[int, int] = {}
        self._unready: set[int] = set()
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._probe: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        return self._thread.is_alive()

    def start(self) -> Balancer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        if self.probe_interval_s is not None:
            self._probe = asyncio.create_task(self._probe_forever(self.probe_interval_s))

    def stop(self) -> None:
        async def close() -> None:
            if self._probe is not None:
                self._probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._probe
            if self._server is not None:
                self._server.close()
                for writer in list(self._open):
                    writer.close()
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def ready_ports(self) -> list[int]:
        return [port for port in self.targets() if port not in self._unready]

    async def _probe_forever(self, interval_s: float) -> None:
        failed: dict[int, int] = {}
        async with httpx.AsyncClient(timeout=max(interval_s, 1.0)) as client:
            while True:
                for port in self.targets():
                    try:
                        response = await client.get(f"http://127.0.0.1:{port}/readyz")
                        ok = response.status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    failures = 0 if ok else failed.get(port, 0) + 1
                    failed[port] = failures
                    if ok:
                        self._unready.discard(port)
                    elif failures >= _FAILURE_THRESHOLD:
                        self._unready.add(port)
                await asyncio.sleep(interval_s)

    async def _connect(self) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        ports = self.ready_ports() or self.targets()
        if not ports:
            return None
        first = next(self._turn)
        for i in range(len(ports)):
            port = ports[(first + i) % len(ports)]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                continue
            self.connections[port] = self.connections.get(port, 0) + 1
            return port, reader, writer
        return None

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            client_w.close()
            return
        _, server_r, server_w = upstream
        self._open |= {client_w, server_w}
        pipes = [
            asyncio.create_task(_pipe(client_r, server_w)),
            asyncio.create_task(_pipe(server_r, client_w)),
        ]
        try:
            await asyncio.gather(*pipes)
        finally:
            for task in pipes:
                task.cancel()
            for writer in (client_w, server_w):
                writer.close()
                self._open.discard(writer)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close, so either side can end its part of the exchange."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class ReplicaSet:
    """N replicas of one config on one database, behind a :class:`Balancer`.

    ``settings`` and ``profiles`` make the shared config file (``database_url`` is added;
    it must be a database every replica reaches, in practice PostgreSQL). ``env`` is
    added to every replica's environment; ``replica_env(i)`` to replica ``i``'s only.
    With ``shared_data_dir``, all replicas use one data directory (one machine); by
    default each has its own under ``root/r<i+1>``.
    """

    def __init__(
        self,
        root: Path,
        *,
        database_url: str,
        profiles: Mapping[str, Mapping[str, Any]],
        settings: Mapping[str, Any] | None = None,
        count: int = 3,
        env: Mapping[str, str] | None = None,
        replica_env: Callable[[int], Mapping[str, str]] | None = None,
        shared_data_dir: bool = False,
        probe_interval_s: float | None = 0.5,
    ) -> None:
        self.root = root
        self.database_url = database_url
        root.mkdir(parents=True, exist_ok=True)
        self.config = write_config(
            root / "pclease.toml",
            {"database_url": database_url, **(settings or {})},
            {name: dict(profile) for name, profile in profiles.items()},
        )
        self.env = {**os.environ, **(env or {})}
        self.replicas: list[LiveServer] = []
        for i in range(count):
            name = f"r{i + 1}"
            data_dir = root / ("shared" if shared_data_dir else name) / "data"
            replica_env_vars = {
                "PCLEASE_DATA_DIR": str(data_dir),
                REPLICA_ID_ENV: name,
                **(replica_env(i) if replica_env else {}),
            }
            self.replicas.append(
                LiveServer(self.config, root / f"{name}.log", env={**self.env, **replica_env_vars})
            )
        self.balancer = Balancer(self.ports, probe_interval_s=probe_interval_s)

    @property
    def url(self) -> str:
        """The balancer's URL: what clients use."""
        return self.balancer.url

    def ports(self) -> list[int]:
        return [server.port for server in self.replicas]

    def cli(self, *args: str) -> str:
        """Run ``pclease <args> --config <the shared config>`` (as the first replica would)."""
        return run_cli(self.config, *args, env=self.replicas[0].env)

    def token(self, name: str, scope: str) -> str:
        return self.cli("token", "create", name, "--scope", scope).strip()

    def start(self, timeout_s: float = 60.0, *, only: Iterable[int] | None = None) -> ReplicaSet:
        """Migrate the database once, start the replicas (in parallel; with ``only``, just
        those: start the others later with :meth:`restart`), then the balancer."""
        self.cli("db", "upgrade")
        chosen = [self.replicas[i] for i in (range(len(self.replicas)) if only is None else only)]
        try:
            for server in chosen:
                server.launch()
            for server in chosen:
                server.wait_ready(timeout_s)
            self.balancer.start()
        except BaseException:
            self.stop()
            raise
        return self

    def terminate(self, i: int) -> None:
        """SIGTERM replica ``i`` and wait for it to exit (a graceful stop)."""
        self.replicas[i].stop()

    def kill(self, i: int) -> None:
        """SIGKILL replica ``i``: no shutdown hook runs."""
        self.replicas[i].kill()

    def restart(self, i: int, timeout_s: float = 60.0) -> None:
        """Start replica ``i`` (again, after :meth:`terminate` or :meth:`kill`), on its
        port, with its data directory and replica id; stops it first if it still runs."""
        server = self.replicas[i]
        server.stop()
        server.start(timeout_s)

    def running(self) -> list[int]:
        return [i for i, server in enumerate(self.replicas) if server.running]

    def logs(self) -> str:
        return "\n".join(
            f"===== replica r{i + 1} =====\n{server.log()}"
            for i, server in enumerate(self.replicas)
            if server.log_path.exists()
        )

    def stop(self) -> None:
        self.balancer.stop()
        for server in self.replicas:
            server.stop()

    def __enter__(self) -> ReplicaSet:
        """Starts every replica, unless :meth:`start` already ran (``with s.start(only=...)``)."""
        return self if self.balancer.started else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
