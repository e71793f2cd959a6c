"""The process behind one local context: ``python -m pclease_service.backends.local_worker``.

Two roles live in this module, one per process:

worker (``--dir DIR``)
    Listens on an abstract Unix socket named after DIR (``multiprocessing.connection``, HMAC
    challenge with the key in ``DIR/authkey``), answers the ops below with a thread per
    connection, and keeps one warm *executor*. It exits by itself after
    ``--orphan-timeout-s`` without any message, so a dead service never leaves it running.

executor (``--executor-fd FD``)
    A child of the worker that imports Polars, warms up, caps its own address space at
    ``RLIMIT_AS = baseline + memory_gb`` and then runs queries one at a time. Plans are only
    ever read here, so a plan that blows the limit (or crashes Polars) kills a process that
    the worker simply replaces. It is started with ``subprocess`` (fork+exec), never a bare
    fork of a process whose Polars thread pool is running.

Wire protocol (both hops): every message is one ``send_bytes`` frame; nothing is pickled.
A request is a JSON header, optionally followed by one raw frame; so is a reply.

========  ==========================================  =====================================
op        request                                     reply
========  ==========================================  =====================================
ping      ``{"op": "ping"}``                          ``{"ok": true, "pid", "polars_version",
                                                      "threads", "memory_gb", "uptime_s",
                                                      "executor_pid"}``
stop      ``{"op": "stop"}``                          ``{"ok": true}``, then the worker exits 0
query     ``{"op": "query", "query_id", "target",     ``{"ok": true, "rows", "result_bytes",
          "result_path", "engine", "timeout_s",       "output"}`` or ``{"ok": false,
          "max_result_bytes", "allow_python_udfs",    "error": {"type", "message"}}``
          "data_roots", "denied_paths"}`` + the plan
          frame (Polars' binary plan, as sent)
========  ==========================================  =====================================

A query passes two rounds of checks before any of it runs. The worker, without decoding
the plan, refuses the ``PLPYFN`` marker of pickled Python (unless the profile allows UDFs)
and plans of another Polars DSL version. The executor then decodes the plan with
:mod:`service.backends.plan_guard` (still without Polars) and refuses every other form of
pickled Python, native plugins, and paths outside the data roots. Only then does Polars
deserialize and run it. A ``collect`` plan (one that sinks to ``"<in-memory>"``, or has no
sink) is re-rooted at the sink's input, collected with the query's engine and written as
Arrow IPC to ``result_path``.

The worker serializes queries per context (one executor, one query at a time). While a
query runs, the worker watches the client's connection as well as the executor: if the
client goes away (the service cancelled the query, or died), the executor is killed and
replaced, exactly as when ``timeout_s`` runs out.

Error types are Polars exception class names, plus ``PlanRefused``, ``PlanInvalid``,
``PlanVersionMismatch``, ``ResultTooLarge``, ``InvalidQuery``, ``MemoryLimitExceeded``,
``QueryTimeout``, ``QueryCancelled``, ``ExecutorCrashed``, ``ExecutorUnavailable`` and
``ProtocolError``.
"""

from __future__ import annotations

import argparse
import contextlib
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
from multiprocessing.connection import wait as wait_readable
from pathlib import Path
from types import ModuleType
from typing import Any

from pclease_service.backends import plan_guard
from pclease_service.backends.base import IN_MEMORY_SINK, QueryTarget
from pclease_service.backends.plan_guard import PlanError


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
ENGINES = frozenset({"auto", "streaming", "in-memory"})
# Polars' messages end with the whole plan ("Resolved plan until failure: ..."); the type
# and first lines say what went wrong.
ERROR_MESSAGE_MAX_CHARS = 2000
# How often a worker waiting for the executor's lock checks whether its client left.
LOCK_POLL_S = 0.1
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


class QueryError(Exception):
    """A query ended without a result; ``type`` is the outcome's error type."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _polars_message(exc: BaseException) -> str:
    text = str(exc).split("\n\nResolved plan until failure")[0].strip()
    return text[:ERROR_MESSAGE_MAX_CHARS]


def _deserialize(pl: ModuleType, plan: bytes) -> Any:
    try:
        return pl.LazyFrame.deserialize(io.BytesIO(plan), format="binary")
    except Exception as exc:
        message = _polars_message(exc)
        if "is not compatible with this Polars version" in message:
            raise QueryError("PlanVersionMismatch", message) from exc
        raise QueryError("PlanInvalid", f"Polars cannot read the plan: {message}") from exc


def _write_result(frame: Any, path: str, max_bytes: int) -> Json:
    too_large = (
        "the result is {size}, more than this service returns ({limit}, max_result_bytes); "
        "sink it to a file in a data root instead (sink_parquet), or reduce it"
    )
    if frame.estimated_size() > max_bytes:
        raise QueryError(
            "ResultTooLarge",
            too_large.format(size=f"about {_size(frame.estimated_size())}", limit=_size(max_bytes)),
        )
    partial = f"{path}.partial"
    try:
        frame.write_ipc(partial)
        size = os.path.getsize(partial)
        if size > max_bytes:
            raise QueryError(
                "ResultTooLarge", too_large.format(size=_size(size), limit=_size(max_bytes))
            )
        os.replace(partial, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return {"ok": True, "rows": frame.height, "result_bytes": size, "output": path}


_COUNT_PLACEHOLDER = "/pclease-count-placeholder"


def _count_template(pl: ModuleType, output: plan_guard.OutputSink) -> bytes | None:
    """A plan counting the rows of a file like the output (its path is replaced later)."""
    options = output.options
    compression = options.get("compression")
    if output.format is QueryTarget.PARQUET:
        lf = pl.scan_parquet(_COUNT_PLACEHOLDER, glob=False)
    elif output.format is QueryTarget.IPC:
        lf = pl.scan_ipc(_COUNT_PLACEHOLDER, glob=False)
    elif output.format is QueryTarget.NDJSON and compression in (None, "Uncompressed"):
        lf = pl.scan_ndjson(_COUNT_PLACEHOLDER)
    elif output.format is QueryTarget.CSV and compression in (None, "Uncompressed"):
        csv = options.get("serialize_options")
        if not isinstance(csv, dict) or csv.get("line_terminator") not in ("\n", "\r\n"):
            return None
        quote = csv.get("quote_char")
        lf = pl.scan_csv(
            _COUNT_PLACEHOLDER,
            has_header=bool(options.get("include_header", True)),
            separator=chr(csv.get("separator", 44)),
            quote_char=chr(quote) if quote else None,
            glob=False,
        )
    else:
        return None
    data: bytes = lf.select(pl.len()).serialize()
    return data


def _count_rows(pl: ModuleType, info: plan_guard.PlanInfo) -> int | None:
    """Rows in the single file a sink wrote, read back from its footer or lines; None when
    that cannot be done cheaply (partitioned or compressed output)."""
    output = info.output
    if output is None or output.kind != "File":
        return None
    try:
        template = _count_template(pl, output)
        if template is None:
            return None
        plan = plan_guard.rescan(template, output.path, info.output_cloud_options())
        return int(_deserialize(pl, plan).collect().item())
    except Exception as exc:
        log.info("could not count the rows of %s: %s", output.path, exc)
        return None


def _run_query(pl: ModuleType, request: Json, plan: bytes) -> Json:
    target = QueryTarget(request["target"])
    info = plan_guard.inspect(plan, allow_python_udfs=bool(request["allow_python_udfs"]))
    plan_guard.check_access(
        info, target, tuple(request["data_roots"]), tuple(request["denied_paths"])
    )
    engine = request["engine"]
    if target is QueryTarget.COLLECT:
        path = request["result_path"]
        try:
            frame = _deserialize(pl, info.without_output_sink()).collect(engine=engine)
            return _write_result(frame, path, int(request["max_result_bytes"]))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    assert info.output is not None  # check_access refuses sink queries without one
    _deserialize(pl, plan).collect(engine=engine)
    path = info.output.path
    size = os.path.getsize(path) if path.startswith("/") and os.path.isfile(path) else None
    return {"ok": True, "rows": _count_rows(pl, info), "result_bytes": size, "output": path}


def _answer(pl: ModuleType, request: Json, plan: bytes, memory_gb: float | None) -> Json:
    oom = {**error_reply("MemoryLimitExceeded", memory_error_message(memory_gb)), "recycle": True}
    try:
        return _run_query(pl, request, plan)
    except (PlanError, QueryError) as exc:
        return error_reply(exc.type, exc.message)
    except MemoryError:
        return oom
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # Polars' PanicException derives from BaseException
        text = f"{type(exc).__name__}: {exc}"
        if memory_gb and looks_like_oom(text):
            return oom
        return error_reply(type(exc).__name__, _polars_message(exc))


def _warm_up(pl: ModuleType) -> None:
    # Touch what most queries touch (the plan guard, both engines, a Parquet scan and sink,
    # an IPC result) so that Polars' thread pools and allocator arenas exist before the
    # baseline address space is measured.
    with tempfile.TemporaryDirectory(prefix="pclease-warmup-") as tmp:
        source = Path(tmp) / "warmup.parquet"
        pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "x"]}).write_parquet(source)
        query = pl.scan_parquet(source).group_by("b").agg(pl.col("a").sum()).sort("b")
        request: Json = {
            "target": QueryTarget.COLLECT.value,
            "result_path": str(Path(tmp) / "warmup.arrow"),
            "engine": "auto",
            "max_result_bytes": 1 << 20,
            "allow_python_udfs": False,
            "data_roots": [tmp],
            "denied_paths": [],
        }
        _run_query(pl, request, query.sink_parquet(IN_MEMORY_SINK, lazy=True).serialize())
        request |= {"target": QueryTarget.PARQUET.value, "engine": "streaming"}
        sink = query.sink_parquet(Path(tmp) / "out.parquet", lazy=True)
        _run_query(pl, request, sink.serialize())


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
            request = recv_json(conn)
            plan = conn.recv_bytes()
        except EOFError:
            return 0
        reply = _answer(pl, request, plan, memory_gb)
        send_json(conn, reply)
        if reply.get("recycle"):
            return 0


class _ExecutorProcess:
    def __init__(self, memory_gb: float | None, on_exit: Callable[[_ExecutorProcess], None]):
        parent_end, child_end = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "pclease_service.backends.local_worker",
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

    def query(self, request: Json, plan: bytes, client: Connection) -> Json:
        """Run one query; ``client`` is the connection it came on, whose end (EOF) cancels
        the query."""
        timeout_s = float(request["timeout_s"])
        deadline = time.monotonic() + timeout_s
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            if client.poll(0):
                return _cancelled()
            if time.monotonic() >= deadline:
                return error_reply(
                    "QueryTimeout",
                    f"another query kept this context busy for the whole timeout of "
                    f"{timeout_s:g} s; retry later or raise timeout_s",
                )
        try:
            return self._query_locked(request, plan, client, timeout_s, deadline)
        finally:
            self._lock.release()

    def _replace(self, proc: _ExecutorProcess) -> None:
        proc.kill()
        self.spawn()

    def _wait(self, proc: _ExecutorProcess, client: Connection, deadline: float) -> str:
        ready = wait_readable([proc.conn, client], max(deadline - time.monotonic(), 0))
        if proc.conn in ready:
            return "answer"
        return "cancelled" if client in ready else "timeout"

    def _query_locked(
        self, request: Json, plan: bytes, client: Connection, timeout_s: float, deadline: float
    ) -> Json:
        proc = self._current
        if proc is None or not proc.alive():
            if proc is not None:
                proc.kill()
            self.spawn()
            proc = self._current
        assert proc is not None
        try:
            if not proc.ready:
                waited = self._wait(proc, client, deadline)
                if waited == "cancelled":
                    return _cancelled()  # the executor keeps warming up for the next query
                if waited == "timeout":
                    return error_reply(
                        "QueryTimeout",
                        f"the executor did not start within the timeout of {timeout_s:g} s",
                    )
                recv_json(proc.conn)
                proc.ready = True
        except (EOFError, OSError, ValueError):
            code, tail = proc.death_notice()
            self._replace(proc)
            last = tail.splitlines()[-1] if tail else "no output"
            return error_reply(
                "ExecutorUnavailable",
                f"the query executor failed to start (exited with {_describe_exit(code)}: {last})",
            )
        try:
            send_json(proc.conn, request)
            proc.conn.send_bytes(plan)
            waited = self._wait(proc, client, deadline)
            if waited != "answer":
                self._replace(proc)
                if waited == "cancelled":
                    log.info("query %s cancelled; executor replaced", request.get("query_id"))
                    return _cancelled()
                return error_reply(
                    "QueryTimeout",
                    f"the query did not finish within its timeout of {timeout_s:g} s and was "
                    "stopped; raise timeout_s or make the query cheaper",
                )
            reply = recv_json(proc.conn)
        except (EOFError, OSError, ValueError):
            code, tail = proc.death_notice()
            self._replace(proc)
            log.warning("executor died during a query with %s", _describe_exit(code))
            # SIGKILL without a word is how the kernel's OOM killer ends a process.
            if self.memory_gb and (looks_like_oom(tail) or code == -signal.SIGKILL):
                return error_reply("MemoryLimitExceeded", memory_error_message(self.memory_gb))
            last = tail.splitlines()[-1] if tail else "no output"
            return error_reply(
                "ExecutorCrashed",
                f"the query crashed its executor ({_describe_exit(code)}: {last})",
            )
        if reply.pop("recycle", False):
            self._replace(proc)
        return reply


def _cancelled() -> Json:
    return error_reply("QueryCancelled", "the query was cancelled")


def _parse_query(request: Json) -> Json:
    """The query op's fields, checked and normalized; raises QueryError("InvalidQuery")."""

    def bad(message: str) -> QueryError:
        return QueryError("InvalidQuery", message)

    try:
        target = QueryTarget(str(request.get("target")))
    except ValueError:
        targets = ", ".join(t.value for t in QueryTarget)
        raise bad(f"target must be one of {targets}, not {request.get('target')!r}") from None
    engine = request.get("engine", "auto")
    if engine not in ENGINES:
        raise bad(f"engine must be one of {', '.join(sorted(ENGINES))}, not {engine!r}")
    result_path = request.get("result_path")
    if target is QueryTarget.COLLECT and not (
        isinstance(result_path, str) and result_path.startswith("/")
    ):
        raise bad("a collect query needs an absolute result_path")
    timeout_s = request.get("timeout_s", 3600.0)
    max_result_bytes = request.get("max_result_bytes", 1 << 30)
    roots = request.get("data_roots", [])
    denied = request.get("denied_paths", [])
    if not (isinstance(timeout_s, int | float) and timeout_s > 0):
        raise bad("timeout_s must be a positive number of seconds")
    if not (isinstance(max_result_bytes, int) and max_result_bytes >= 0):
        raise bad("max_result_bytes must be a whole number of bytes")
    for name, value in (("data_roots", roots), ("denied_paths", denied)):
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise bad(f"{name} must be a list of strings")
    return {
        "op": "query",
        "query_id": str(request.get("query_id", "")),
        "target": target.value,
        "result_path": result_path,
        "engine": engine,
        "timeout_s": float(timeout_s),
        "max_result_bytes": max_result_bytes,
        "allow_python_udfs": request.get("allow_python_udfs") is True,
        "data_roots": roots,
        "denied_paths": denied,
    }


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
        self.dsl_header: plan_guard.PlanHeader | None = None

    def serve(self) -> None:
        import polars as pl

        self.polars_version = pl.__version__
        self.dsl_header = plan_guard.read_header(pl.LazyFrame().serialize())
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
        elif op == "query":
            plan = conn.recv_bytes()
            send_json(conn, self._query(request, plan, conn))
        else:
            send_json(conn, error_reply("ProtocolError", f"unknown op {op!r}"))

    def _query(self, request: Json, plan: bytes, conn: Connection) -> Json:
        # The checks that need no plan decoding run here, so a refused plan never even
        # reaches the executor (the executor repeats them: defence in depth).
        assert self.dsl_header is not None
        try:
            query = _parse_query(request)
            plan_guard.refuse_python_udfs(plan, query["allow_python_udfs"])
            header = plan_guard.read_header(plan)
            plan_guard.check_compatible(header, self.dsl_header, self.polars_version)
        except (PlanError, QueryError) as exc:
            log.info("query %s refused: %s", request.get("query_id"), exc.type)
            return error_reply(exc.type, exc.message)
        reply = self.executor.query(query, plan, conn)
        error = reply.get("error") or {}
        log.info("query %s: %s", query["query_id"], error.get("type") or "ok")
        return reply


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
    parser = argparse.ArgumentParser(prog="python -m pclease_service.backends.local_worker")
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
