"""The process behind one local context: ``python -m service.backends.local_worker``.

Two roles live in this module, one per process:

worker (``--dir DIR``)
    Listens on an abstract Unix socket named after DIR (``multiprocessing.connection``, HMAC
    challenge with the key in ``DIR/authkey``), answers the ops below with a thread per
    connection, and keeps one warm *executor*. It exits by itself after
    ``--orphan-timeout-s`` without any message, so a dead service never leaves it running.

executor (``--executor-fd FD``)
    A child of the worker that imports Polars, warms up, caps its own address space at
    ``RLIMIT_AS = baseline + memory_gb`` and then runs plans one at a time. Plans are only
    ever deserialized here, so a plan that blows the limit (or crashes Polars) kills a
    process that the worker simply replaces. It is started with ``subprocess`` (fork+exec),
    never a bare fork of a process whose Polars thread pool is running.

Wire protocol (both hops): every message is one ``send_bytes`` frame; nothing is pickled.
A request is a JSON header, optionally followed by one raw frame; so is a reply.

========  ==========================================  =====================================
op        request                                     reply
========  ==========================================  =====================================
ping      ``{"op": "ping"}``                          ``{"ok": true, "pid", "polars_version",
                                                      "threads", "memory_gb", "uptime_s",
                                                      "executor_pid"}``
stop      ``{"op": "stop"}``                          ``{"ok": true}``, then the worker exits 0
run       ``{"op": "run", "timeout_s"}`` + plan frame  ``{"ok": true, "payload": true}`` + Arrow
          (``LazyFrame.serialize()``, binary)          IPC frame, or ``{"ok": false, "error":
                                                      {"type", "message"}}``
========  ==========================================  =====================================

Error types are Polars exception class names, plus ``MemoryLimitExceeded``,
``QueryTimeout``, ``ExecutorCrashed``, ``ExecutorUnavailable`` and ``ProtocolError``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from types import ModuleType
from typing import Any


def socket_address(directory: Path) -> str:
    """The worker's socket, in Linux's abstract namespace.

    A path under ``directory`` could exceed the 107 bytes a socket path may have (deep
    temporary or data directories do); an abstract name has no such limit, leaves no file
    behind when the worker dies, and the authkey still guards every connection.
    """
    digest = hashlib.sha256(str(directory.resolve()).encode()).hexdigest()[:40]
    return f"\0pclease-worker-{digest}"


AUTHKEY_NAME = "authkey"
META_NAME = "meta.json"
LOG_NAME = "worker.log"

#: Exit code of a worker that heard nothing from the service for ``orphan_timeout_s``.
EXIT_ORPHANED = 3

HEADER_MAX_BYTES = 1 << 20
HANDSHAKE_TIMEOUT_S = 5.0
# Between requests a client may keep its connection open; one that says nothing for this
# long is dropped so its thread does not live forever.
IDLE_CONNECTION_TIMEOUT_S = 60.0
EXECUTOR_STDERR_LINES = 20
RESPAWN_MIN_LIFETIME_S = 10.0

# Messages Polars, Rust or libc produce when an allocation fails under RLIMIT_AS.
_OOM_MARKERS = (
    "memory allocation of",
    "cannot allocate memory",
    "out of memory",
    "os error 12",
    "failed to spawn thread",
    "memoryerror",
)

Json = dict[str, Any]
log = logging.getLogger("pclease.local_worker")


# -- framing shared with service.backends.local -------------------------------------------
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


def memory_error_message(memory_gb: float | None) -> str:
    limit = f"{memory_gb:g} GB" if memory_gb else "the machine's memory"
    return (
        f"query exceeded the profile's memory limit of {limit} (memory_gb); "
        "use a larger profile or sink instead of collect"
    )


def looks_like_oom(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _OOM_MARKERS)


# -- executor (child of the worker) -------------------------------------------------------
def _vm_size_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    match = re.search(r"^VmSize:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0


def _collect_to_ipc(pl: ModuleType, plan: bytes) -> bytes:
    frame = pl.LazyFrame.deserialize(io.BytesIO(plan), format="binary").collect()
    out = io.BytesIO()
    frame.write_ipc(out)
    return out.getvalue()


def _warm_up(pl: ModuleType) -> None:
    # Touch what most queries touch (both engines, a Parquet scan) so that Polars' thread
    # pools and allocator arenas exist before the baseline address space is measured.
    lf = pl.LazyFrame({"a": [1, 2, 3], "b": ["x", "y", "x"]})
    query = lf.group_by("b").agg(pl.col("a").sum()).sort("b")
    _collect_to_ipc(pl, query.serialize())
    query.collect(engine="streaming")
    with tempfile.TemporaryDirectory(prefix="pclease-warmup-") as tmp:
        path = Path(tmp) / "warmup.parquet"
        lf.collect().write_parquet(path)
        pl.scan_parquet(path).collect()


def _exit_when_orphaned(parent_pid: int) -> None:
    # A query can run for a long time without reading from the worker; this is how the
    # executor notices that its worker was SIGKILLed meanwhile.
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(0)


def executor_main(fd: int, memory_gb: float | None) -> int:
    conn = Connection(fd)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    import resource

    import polars as pl

    _warm_up(pl)
    baseline = _vm_size_bytes()
    limit = None
    if memory_gb:
        # RLIMIT_AS counts address space, and Polars' runtime alone reserves ~1 GB of it
        # with few pages resident, so the query's budget sits on top of that baseline.
        limit = baseline + int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    send_json(
        conn, {"ready": True, "pid": os.getpid(), "baseline_bytes": baseline, "limit_bytes": limit}
    )
    while True:
        try:
            recv_json(conn)
            plan = conn.recv_bytes()
        except EOFError:
            return 0
        try:
            data = _collect_to_ipc(pl, plan)
        except MemoryError:
            send_json(
                conn,
                {
                    **error_reply("MemoryLimitExceeded", memory_error_message(memory_gb)),
                    "recycle": True,
                },
            )
            return 0
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # Polars' PanicException derives from BaseException
            text = f"{type(exc).__name__}: {exc}"
            if memory_gb and looks_like_oom(text):
                send_json(
                    conn,
                    {
                        **error_reply("MemoryLimitExceeded", memory_error_message(memory_gb)),
                        "recycle": True,
                    },
                )
                return 0
            send_json(conn, error_reply(type(exc).__name__, str(exc)))
            continue
        send_json(conn, {"ok": True, "payload": True})
        conn.send_bytes(data)


class _ExecutorProcess:
    def __init__(self, memory_gb: float | None, on_exit: Callable[[_ExecutorProcess], None]):
        parent_end, child_end = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "service.backends.local_worker",
            "--executor-fd",
            str(child_end.fileno()),
        ]
        if memory_gb:
            argv += ["--memory-gb", repr(memory_gb)]
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(child_end.fileno(),),
            )
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()
        self.conn = Connection(parent_end.detach())
        self.ready = False
        self.spawned_at = time.monotonic()
        self.stderr_tail: deque[str] = deque(maxlen=EXECUTOR_STDERR_LINES)
        self._on_exit = on_exit
        self._reader = threading.Thread(target=self._forward_stderr, daemon=True)
        self._reader.start()
        log.info("executor %d spawned", self.proc.pid)

    def _forward_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self.stderr_tail.append(line)
            print(f"executor[{self.proc.pid}]: {line}", file=sys.stderr, flush=True)
        self.proc.stderr.close()
        self._on_exit(self)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()

    def death_notice(self) -> tuple[int | None, str]:
        """Exit code and last stderr lines of an executor that has died or is dying."""
        try:
            code: int | None = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout=2)
        return code, "\n".join(self.stderr_tail)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


class Executor:
    """The worker's single warm executor: one query at a time, replaced when it dies."""

    def __init__(self, memory_gb: float | None) -> None:
        self.memory_gb = memory_gb
        self._lock = threading.Lock()
        self._current: _ExecutorProcess | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        current = self._current
        return current.proc.pid if current is not None and current.alive() else None

    def spawn(self) -> None:
        if not self._closed:
            self._current = _ExecutorProcess(self.memory_gb, self._exited)

    def _exited(self, proc: _ExecutorProcess) -> None:
        # An executor that dies while idle is replaced now, so the next query finds a warm
        # one; one that dies during a query is handled (and replaced) by run().
        if self._closed or proc is not self._current or not self._lock.acquire(blocking=False):
            return
        try:
            if proc is self._current:
                code, _ = proc.death_notice()
                proc.conn.close()
                if time.monotonic() - proc.spawned_at < RESPAWN_MIN_LIFETIME_S:
                    # Dying this young means it cannot start at all; the next query will
                    # try again and report why, instead of this loop burning a CPU.
                    log.warning(
                        "executor exited with %s right after it started", _describe_exit(code)
                    )
                    return
                log.warning("idle executor exited with %s; replacing it", _describe_exit(code))
                self.spawn()
        finally:
            self._lock.release()

    def close(self) -> None:
        self._closed = True
        current = self._current
        if current is not None:
            current.kill()

    def run(self, plan: bytes, timeout_s: float) -> tuple[Json, bytes | None]:
        deadline = time.monotonic() + timeout_s
        if not self._lock.acquire(timeout=max(timeout_s, 0)):
            return error_reply(
                "QueryTimeout",
                f"another query kept this context busy for the whole timeout of {timeout_s:g} s",
            ), None
        try:
            return self._run_locked(plan, timeout_s, deadline)
        finally:
            self._lock.release()

    def _replace(self, proc: _ExecutorProcess) -> None:
        proc.kill()
        self.spawn()

    def _run_locked(
        self, plan: bytes, timeout_s: float, deadline: float
    ) -> tuple[Json, bytes | None]:
        proc = self._current
        if proc is None or not proc.alive():
            if proc is not None:
                proc.kill()
            self.spawn()
            proc = self._current
        assert proc is not None
        try:
            if not proc.ready:
                if not proc.conn.poll(max(deadline - time.monotonic(), 0)):
                    return error_reply(
                        "QueryTimeout",
                        f"the executor did not start within the timeout of {timeout_s:g} s",
                    ), None
                recv_json(proc.conn)
                proc.ready = True
        except (EOFError, OSError, ValueError):
            code, tail = proc.death_notice()
            self._replace(proc)
            last = tail.splitlines()[-1] if tail else "no output"
            return error_reply(
                "ExecutorUnavailable",
                f"the query executor failed to start (exited with {_describe_exit(code)}: {last})",
            ), None
        try:
            send_json(proc.conn, {"op": "run"})
            proc.conn.send_bytes(plan)
            if not proc.conn.poll(max(deadline - time.monotonic(), 0)):
                self._replace(proc)
                return error_reply(
                    "QueryTimeout",
                    f"the query did not finish within {timeout_s:g} s and was cancelled",
                ), None
            reply = recv_json(proc.conn)
            data = proc.conn.recv_bytes() if reply.get("ok") else None
        except (EOFError, OSError, ValueError):
            code, tail = proc.death_notice()
            self._replace(proc)
            log.warning("executor died during a query with %s", _describe_exit(code))
            # SIGKILL without a word is how the kernel's OOM killer ends a process.
            if self.memory_gb and (looks_like_oom(tail) or code == -signal.SIGKILL):
                return error_reply(
                    "MemoryLimitExceeded", memory_error_message(self.memory_gb)
                ), None
            last = tail.splitlines()[-1] if tail else "no output"
            return error_reply(
                "ExecutorCrashed",
                f"the query crashed its executor ({_describe_exit(code)}: {last})",
            ), None
        if reply.pop("recycle", False):
            self._replace(proc)
        return reply, data


# -- worker -------------------------------------------------------------------------------
class Worker:
    def __init__(self, directory: Path, orphan_timeout_s: float) -> None:
        self.directory = directory
        self.orphan_timeout_s = orphan_timeout_s
        self.authkey = (directory / AUTHKEY_NAME).read_bytes()
        meta = json.loads((directory / META_NAME).read_text())
        self.memory_gb: float | None = meta.get("memory_gb")
        self.context_id: str = meta.get("context_id", "?")
        self.started = time.monotonic()
        self.executor = Executor(self.memory_gb)
        self._state = threading.Lock()
        self._last_contact = time.monotonic()
        self._active = 0
        self._exiting = threading.Lock()
        self.polars_version = "?"

    def serve(self) -> None:
        import polars as pl

        self.polars_version = pl.__version__
        self._pl = pl
        self.executor.spawn()
        listener = Listener(socket_address(self.directory), family="AF_UNIX", backlog=32)
        self._touch()
        threading.Thread(target=self._watch_orphan, daemon=True).start()
        log.info("worker for context %s is listening", self.context_id)
        while True:
            try:
                conn = listener.accept()
            except OSError:
                log.exception("accept failed")
                continue
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _touch(self) -> None:
        with self._state:
            self._last_contact = time.monotonic()

    def _watch_orphan(self) -> None:
        interval = min(1.0, self.orphan_timeout_s / 5)
        while True:
            time.sleep(interval)
            with self._state:
                idle = time.monotonic() - self._last_contact
                busy = self._active > 0
            if not busy and idle > self.orphan_timeout_s:
                log.warning(
                    "no contact from the service for %.1f s (orphan timeout %.1f s); exiting",
                    idle,
                    self.orphan_timeout_s,
                )
                self.exit(EXIT_ORPHANED)

    def exit(self, code: int) -> None:
        with self._exiting:
            self.executor.close()
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)

    def terminate(self, signum: int, _frame: object) -> None:
        # Clean up the executor, then die by the signal so the exit status stays honest.
        with self._exiting:
            self.executor.close()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _serve_connection(self, conn: Connection) -> None:
        with conn:
            try:
                set_io_timeout(conn.fileno(), HANDSHAKE_TIMEOUT_S)
                deliver_challenge(conn, self.authkey)
                answer_challenge(conn, self.authkey)
                set_io_timeout(conn.fileno(), IDLE_CONNECTION_TIMEOUT_S)
                while True:
                    try:
                        request = recv_json(conn)
                    except EOFError:
                        return
                    with self._state:
                        self._active += 1
                        self._last_contact = time.monotonic()
                    try:
                        self._dispatch(conn, request)
                    finally:
                        with self._state:
                            self._active -= 1
                            self._last_contact = time.monotonic()
            except AuthenticationError:
                log.warning("rejected a connection that failed authentication")
            except (OSError, EOFError, ValueError) as exc:
                log.info("connection dropped: %s: %s", type(exc).__name__, exc)

    def _dispatch(self, conn: Connection, request: Json) -> None:
        op = request.get("op")
        if op == "ping":
            send_json(
                conn,
                {
                    "ok": True,
                    "pid": os.getpid(),
                    "polars_version": self.polars_version,
                    "threads": self._pl.thread_pool_size(),
                    "memory_gb": self.memory_gb,
                    "uptime_s": round(time.monotonic() - self.started, 3),
                    "executor_pid": self.executor.pid,
                },
            )
        elif op == "stop":
            log.info("stop requested")
            send_json(conn, {"ok": True})
            self.exit(0)
        elif op == "run":
            plan = conn.recv_bytes()
            timeout_s = float(request.get("timeout_s", 60.0))
            reply, data = self.executor.run(plan, timeout_s)
            send_json(conn, reply)
            if data is not None:
                conn.send_bytes(data)
        else:
            send_json(conn, error_reply("ProtocolError", f"unknown op {op!r}"))


def worker_main(directory: Path, orphan_timeout_s: float, boot_delay_s: float) -> int:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s",
    )
    worker = Worker(directory, orphan_timeout_s)
    signal.signal(signal.SIGTERM, worker.terminate)
    if boot_delay_s > 0:
        log.info("simulated boot: sleeping %.1f s", boot_delay_s)
        time.sleep(boot_delay_s)
    worker.serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.backends.local_worker")
    parser.add_argument("--dir", type=Path, help="the worker's directory (worker role)")
    parser.add_argument("--orphan-timeout-s", type=float, default=120.0)
    parser.add_argument("--boot-delay-s", type=float, default=0.0)
    parser.add_argument("--executor-fd", type=int, help="socket fd to the worker (executor role)")
    parser.add_argument("--memory-gb", type=float, default=None)
    args = parser.parse_args(argv)
    if args.executor_fd is not None:
        return executor_main(args.executor_fd, args.memory_gb)
    if args.dir is None:
        parser.error("--dir or --executor-fd is required")
    return worker_main(args.dir, args.orphan_timeout_s, args.boot_delay_s)


if __name__ == "__main__":
    sys.exit(main())
