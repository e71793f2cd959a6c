"""The wire between the service and its local workers, and between a worker and its
executor: every message is one ``send_bytes`` frame of a ``multiprocessing`` connection;
nothing is pickled. A request is a JSON header, optionally followed by one raw frame; so
is a reply. The ops are listed in :mod:`pclease_service.backends.local_worker`.

Also the names of the files in a worker's directory and how an exit status reads.
"""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import struct
from collections.abc import Mapping
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

AUTHKEY_NAME = "authkey"
META_NAME = "meta.json"
LOG_NAME = "worker.log"

#: Exit code of a worker that heard nothing from the service for ``orphan_timeout_s``.
EXIT_ORPHANED = 3

HEADER_MAX_BYTES = 1 << 20

#: A worker drops a connection that says nothing for this long between requests, so that
#: its thread does not live forever; the service keeps an idle one for half as long.
IDLE_CONNECTION_TIMEOUT_S = 60.0

Json = dict[str, Any]


def socket_address(directory: Path) -> str:
    """The worker's socket, in Linux's abstract namespace.

    A path under ``directory`` could exceed the 107 bytes a socket path may have (deep
    temporary or data directories do); an abstract name has no such limit, leaves no file
    behind when the worker dies, and the authkey still guards every connection.
    """
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:40]
    return f"\0pclease-worker-{digest}"


def set_io_timeout(sock_fd: int, seconds: float) -> None:
    """Make blocking reads and writes on a socket fd fail after ``seconds`` (0: never).

    ``Connection`` works on a raw fd and has no timeouts of its own; the kernel's
    SO_RCVTIMEO/SO_SNDTIMEO make a stuck read raise ``BlockingIOError`` instead of hanging.
    """
    whole = int(seconds)
    timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
    sock = socket.socket(fileno=sock_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    finally:
        sock.detach()


def send_json(conn: Connection, message: Mapping[str, Any]) -> None:
    conn.send_bytes(json.dumps(message).encode())


def recv_json(conn: Connection) -> Json:
    message = json.loads(conn.recv_bytes(HEADER_MAX_BYTES))
    if not isinstance(message, dict):
        raise ValueError("expected a JSON object")
    return message


def error_reply(type_: str, message: str) -> Json:
    return {"ok": False, "error": {"type": type_, "message": message}}


def describe_exit(code: int | None) -> str:
    """How a process ended, in words: ``code 1``, ``signal 9 (SIGKILL)``."""
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"
