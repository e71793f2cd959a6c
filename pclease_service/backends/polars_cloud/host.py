"""The polars-cloud client in a process of its own, so the service's environment stays its own.

The client is configured through environment variables (``POLARS_CLOUD_API_ADDR`` read once
per process, ``POLARS_CLOUD_CONFIG_DIR``, and ``POLARS_CLOUD_ACCESS_TOKEN`` read on every
call), so the service does not run it: :class:`ClientHost` starts
``python -m pclease_service.backends.polars_cloud`` with an environment made for it
(:func:`client_environment`: no service secrets, no client credentials) and sends it one
request per call. The host sets the access token each request carries in its own
environment, calls :class:`~.client.CloudClient` on a thread pool and answers; any
exception becomes a :class:`~.client.CloudError` there, where polars-cloud's exception
types exist.

Wire: a ``multiprocessing`` connection over a socket pair. Requests are ``(id, token,
method, args, kwargs)``, answers ``(id, True, value)`` or ``(id, False, (message, auth,
not_found))``, pickled: both ends are this code, and the host is the service's own child.

A host that dies fails the calls waiting on it with a :class:`~.client.CloudError`; the
next call starts a new one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from pclease_service.backends.polars_cloud.client import CloudClient, CloudError

log = logging.getLogger("pclease.backends.polars_cloud")

#: The CloudClient methods a request may name.
METHODS = frozenset(
    {
        "user_id",
        "workspace_id",
        "start",
        "register_manifest",
        "find_manifest",
        "start_manifest",
        "get",
        "stop",
        "list",
        "submit",
        "query_status",
        "query_output",
        "cancel",
    }
)
# Enough for the backend's thread pool to keep every one of its calls under way at once.
_THREADS = 16
# Variables the client may need and that carry no secret: where things are, how to reach
# the network, and the client's own settings.
_PASSTHROUGH = frozenset(
    {
        "PATH",
        "LANG",
        "TMPDIR",
        "HOME",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    }
)
# The variables the client would do its own token exchange with, or take a token from.
_CLIENT_SECRETS = frozenset(
    {"POLARS_CLOUD_CLIENT_ID", "POLARS_CLOUD_CLIENT_SECRET", "POLARS_CLOUD_ACCESS_TOKEN"}
)
# The directory holding the ``pclease_service`` package, so that ``-m`` resolves in a host
# whose environment has been scrubbed.
_CODE_ROOT = Path(__file__).resolve().parents[3]


def client_environment(
    api_addr: str | None,
    config_dir: Path,
    *,
    hidden: Set[str] = frozenset(),
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The host's environment: ``environ`` (default ``os.environ``) less everything but
    the variables the client may need, less its credentials and ``hidden`` (say, the env
    credential source's variables), plus where to find Polars Cloud and keep its files."""
    environ = os.environ if environ is None else environ
    env = {
        key: value
        for key, value in environ.items()
        if (key in _PASSTHROUGH or key.startswith(("LC_", "POLARS_CLOUD_")))
        and key not in _CLIENT_SECRETS
        and key not in hidden
    }
    env["PYTHONPATH"] = str(_CODE_ROOT)
    env["POLARS_CLOUD_CONFIG_DIR"] = str(config_dir)
    if api_addr:
        env["POLARS_CLOUD_API_ADDR"] = api_addr
    return env


@dataclass(eq=False)
class _Process:
    proc: subprocess.Popen[bytes]
    conn: Connection
    pending: dict[int, concurrent.futures.Future[tuple[bool, Any]]] = field(default_factory=dict)


class ClientHost:
    """The service's end: starts the host on first use and relays calls (thread-safe,
    blocking; the backend calls it from its own threads)."""

    def __init__(self, env: Mapping[str, str], *, python: str = sys.executable) -> None:
        self.env = dict(env)
        self.python = python
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._current: _Process | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        current = self._current
        return current.proc.pid if current is not None and current.proc.poll() is None else None

    def call(self, token: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``CloudClient.<method>(*args, **kwargs)`` in the host, sending ``token``."""
        if method not in METHODS:
            raise ValueError(f"not a client call: {method}")
        future: concurrent.futures.Future[tuple[bool, Any]] = concurrent.futures.Future()
        with self._lock:
            host = self._running()
            call_id = next(self._ids)
            host.pending[call_id] = future
        try:
            with self._send_lock:
                host.conn.send((call_id, token, method, args, kwargs))
        except (OSError, ValueError) as exc:
            with self._lock:
                host.pending.pop(call_id, None)
            raise CloudError(f"the polars-cloud client process is gone ({exc})") from None
        ok, value = future.result()
        if ok:
            return value
        message, auth, not_found = value
        raise CloudError(message, auth=auth, not_found=not_found)

    def _running(self) -> _Process:
        if self._closed:
            raise CloudError("the polars-cloud client process was closed")
        current = self._current
        if current is not None and current.proc.poll() is None:
            return current
        parent_end, child_end = socket.socketpair()
        fd = child_end.fileno()
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "pclease_service.backends.polars_cloud", str(fd)],
                stdin=subprocess.DEVNULL,
                env=self.env,
                pass_fds=(fd,),
                close_fds=True,
            )
        except OSError as exc:
            parent_end.close()
            raise CloudError(f"could not start the polars-cloud client process: {exc}") from None
        finally:
            child_end.close()
        current = self._current = _Process(proc, Connection(parent_end.detach()))
        threading.Thread(
            target=self._read, args=(current,), name="pclease-polars-cloud-host", daemon=True
        ).start()
        log.info("started the polars-cloud client process %d", proc.pid)
        return current

    def _read(self, host: _Process) -> None:
        while True:
            try:
                call_id, ok, value = host.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = host.pending.pop(call_id, None)
            if future is not None:
                future.set_result((ok, value))
        code = host.proc.wait()
        with self._lock:
            lost, host.pending = host.pending, {}
            if self._current is host:
                self._current = None
        host.conn.close()
        if lost and not self._closed:
            log.warning("the polars-cloud client process exited (code %s)", code)
        for future in lost.values():
            message = f"the polars-cloud client process exited (code {code}); retry the call"
            future.set_result((False, (message, False, False)))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            current = self._current
        if current is None:
            return
        # Shut the socket down rather than close it under the reader thread: both ends see
        # EOF, the host exits and the reader closes the connection.
        with contextlib.suppress(OSError):
            sock = socket.socket(fileno=current.conn.fileno())
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.detach()
        try:
            current.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            current.proc.kill()
            current.proc.wait()


# -- the host process ---------------------------------------------------------------------
def _answer(client: CloudClient, conn: Connection, send_lock: threading.Lock, request: Any) -> None:
    from pclease_service.backends.polars_cloud.client import translate, use_token

    call_id, token, method, args, kwargs = request
    try:
        if method not in METHODS:
            raise CloudError(f"not a client call: {method}")
        use_token(token)
        reply = (call_id, True, getattr(client, method)(*args, **kwargs))
    except Exception as exc:
        error = translate(exc)
        reply = (call_id, False, (error.message, error.auth, error.not_found))
    with send_lock, contextlib.suppress(OSError):
        conn.send(reply)


def main(argv: list[str]) -> int:
    conn = Connection(int(argv[0]))
    client = CloudClient()
    send_lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=_THREADS)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break  # the service closed its end, or died
        pool.submit(_answer, client, conn, send_lock, request)
    # Calls still under way are abandoned: nobody waits for their answers any more.
    os._exit(0)
