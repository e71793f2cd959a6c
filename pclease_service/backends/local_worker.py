"""The process behind one local context: ``python -m pclease_service.backends.local_worker``.

Two roles live in this module, one per process:

worker (``--dir DIR``)
    Listens on an abstract Unix socket named after DIR (``multiprocessing.connection``, HMAC
    challenge with the key in ``DIR/authkey``), answers the ops below with a thread per
    connection, and keeps a pool of warm *executors*, one per query it runs at once
    (``concurrent_queries`` in ``DIR/meta.json``, the profile's setting). It exits by itself
    after ``--orphan-timeout-s`` without any message, so a dead service never leaves it
    running.

executor (``--executor-fd FD``, :mod:`~pclease_service.backends.local_executor`)
    A child of the worker that imports Polars and runs queries one at a time, within its
    share of the profile's memory (``memory_gb / concurrent_queries``). Plans are only ever
    read there. It is started with ``subprocess`` (fork+exec), never a bare fork of a
    process whose Polars thread pool is running.

Wire protocol (both hops, :mod:`~pclease_service.backends.local_wire`): every message is
one ``send_bytes`` frame; nothing is pickled.

========  ==========================================  =====================================
op        request                                     reply
========  ==========================================  =====================================
ping      ``{"op": "ping"}``                          ``{"ok": true, "pid", "polars_version",
                                                      "threads", "memory_gb", "uptime_s",
                                                      "executor_pid", "executor_pids"}``
stop      ``{"op": "stop"}``                          ``{"ok": true}``, then the worker exits 0
query     ``{"op": "query", "query_id", "target",     ``{"ok": true, "rows", "result_bytes",
          "result_path", "engine", "timeout_s",       "output"}`` or ``{"ok": false,
          "max_result_bytes", "allow_python_udfs",    "error": {"type", "message"}}``
          "data_roots", "denied_paths"}`` + the plan
          frame (Polars' binary plan, as sent)
========  ==========================================  =====================================

The worker checks a query request's fields; the executor runs the plan pipeline
(:mod:`pclease_service.plans`) on the plan before Polars deserializes it.

The worker runs as many queries at once as it has executors; a query beyond that waits
for the first executor to come free (the service's runner keeps its own queue, in
submission order, and sends no more than that). While a query runs, the worker watches
the client's connection as well as the executor: if the client goes away (the service
cancelled the query, or died), the executor is killed and replaced, exactly as when
``timeout_s`` runs out.

Error types are Polars exception class names, plus ``PlanRefused``, ``PlanInvalid``,
``PlanVersionMismatch``, ``ResultTooLarge``, ``InvalidQuery``, ``MemoryLimitExceeded``,
``QueryTimeout``, ``QueryCancelled``, ``ExecutorCrashed``, ``ExecutorUnavailable`` and
``ProtocolError``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from multiprocessing.connection import wait as wait_readable
from pathlib import Path

from pclease_service.backends.local_executor import (
    QueryError,
    executor_main,
    looks_like_oom,
    memory_error_message,
)
from pclease_service.backends.local_wire import (
    AUTHKEY_NAME,
    EXIT_ORPHANED,
    IDLE_CONNECTION_TIMEOUT_S,
    META_NAME,
    Json,
    describe_exit,
    error_reply,
    recv_json,
    send_json,
    set_io_timeout,
    socket_address,
)
from pclease_service.plans.targets import QueryTarget

ENGINES = frozenset({"auto", "streaming", "in-memory"})
# How often a worker waiting for the executor's lock checks whether its client left.
LOCK_POLL_S = 0.1
HANDSHAKE_TIMEOUT_S = 5.0
EXECUTOR_STDERR_LINES = 20
RESPAWN_MIN_LIFETIME_S = 10.0

log = logging.getLogger("pclease.local_worker")


class _ExecutorProcess:
    def __init__(
        self,
        memory_gb: float | None,
        on_exit: Callable[[_ExecutorProcess], None],
        shared_by: int = 1,
    ):
        parent_end, child_end = socket.socketpair()
        argv = [
            sys.executable,
            "-m",
            "pclease_service.backends.local_worker",
            "--executor-fd",
            str(child_end.fileno()),
        ]
        if memory_gb:
            argv += ["--memory-gb", repr(memory_gb), "--shared-by", str(shared_by)]
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


class Executor:
    """One warm executor of the worker: one query at a time, replaced when it dies.
    ``memory_gb`` is its own limit, a share of the profile's (``shared_by`` executors)."""

    def __init__(self, memory_gb: float | None, shared_by: int = 1) -> None:
        self.memory_gb = memory_gb
        self.shared_by = shared_by
        self._lock = threading.Lock()
        self._current: _ExecutorProcess | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        current = self._current
        return current.proc.pid if current is not None and current.alive() else None

    def spawn(self) -> None:
        if not self._closed:
            self._current = _ExecutorProcess(self.memory_gb, self._exited, self.shared_by)

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
                        "executor exited with %s right after it started", describe_exit(code)
                    )
                    return
                log.warning("idle executor exited with %s; replacing it", describe_exit(code))
                self.spawn()
        finally:
            self._lock.release()

    def close(self) -> None:
        self._closed = True
        current = self._current
        if current is not None:
            current.kill()

    def try_query(
        self, request: Json, plan: bytes, client: Connection, deadline: float
    ) -> Json | None:
        """Run one query if this executor is free (None if it is busy); ``client`` is the
        connection it came on, whose end (EOF) cancels the query."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._query_locked(request, plan, client, float(request["timeout_s"]), deadline)
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
                f"the query executor failed to start (exited with {describe_exit(code)}: {last})",
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
            log.warning("executor died during a query with %s", describe_exit(code))
            # SIGKILL without a word is how the kernel's OOM killer ends a process.
            if self.memory_gb and (looks_like_oom(tail) or code == -signal.SIGKILL):
                return error_reply(
                    "MemoryLimitExceeded", memory_error_message(self.memory_gb, self.shared_by)
                )
            last = tail.splitlines()[-1] if tail else "no output"
            return error_reply(
                "ExecutorCrashed",
                f"the query crashed its executor ({describe_exit(code)}: {last})",
            )
        if reply.pop("recycle", False):
            self._replace(proc)
        return reply


class ExecutorPool:
    """The worker's executors: ``size`` queries run at once, each in an executor of its
    own with ``memory_gb / size`` of memory; a query beyond that waits for one to free."""

    def __init__(self, size: int, memory_gb: float | None) -> None:
        share = memory_gb / size if memory_gb else None
        self.executors = [Executor(share, size) for _ in range(size)]

    @property
    def pids(self) -> list[int | None]:
        return [executor.pid for executor in self.executors]

    def spawn(self) -> None:
        for executor in self.executors:
            executor.spawn()

    def close(self) -> None:
        for executor in self.executors:
            executor.close()

    def query(self, request: Json, plan: bytes, client: Connection) -> Json:
        """Run one query on the first free executor; see :meth:`Executor.try_query`."""
        timeout_s = float(request["timeout_s"])
        deadline = time.monotonic() + timeout_s
        while True:
            for executor in self.executors:
                reply = executor.try_query(request, plan, client, deadline)
                if reply is not None:
                    return reply
            if client.poll(LOCK_POLL_S):
                return _cancelled()
            if time.monotonic() >= deadline:
                return error_reply(
                    "QueryTimeout",
                    f"other queries kept this context's {len(self.executors)} executor(s) busy "
                    f"for the whole timeout of {timeout_s:g} s; retry later or raise timeout_s",
                )


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
        self.executors = ExecutorPool(int(meta.get("concurrent_queries") or 1), self.memory_gb)
        self._state = threading.Lock()
        self._last_contact = time.monotonic()
        self._active = 0
        self._exiting = threading.Lock()
        self.polars_version = "?"

    def serve(self) -> None:
        import polars as pl

        self.polars_version = pl.__version__
        self._pl = pl
        self.executors.spawn()
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
            self.executors.close()
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)

    def terminate(self, signum: int, _frame: object) -> None:
        # Clean up the executor, then die by the signal so the exit status stays honest.
        with self._exiting:
            self.executors.close()
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
                    "executor_pid": self.executors.pids[0],
                    "executor_pids": self.executors.pids,
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
        # The plan itself is checked by the executor, before Polars reads it.
        try:
            query = _parse_query(request)
        except QueryError as exc:
            log.info("query %s refused: %s", request.get("query_id"), exc.type)
            return error_reply(exc.type, exc.message)
        reply = self.executors.query(query, plan, conn)
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
    parser.add_argument("--shared-by", type=int, default=1, help="executors sharing memory")
    args = parser.parse_args(argv)
    if args.executor_fd is not None:
        return executor_main(args.executor_fd, args.memory_gb, args.shared_by)
    if args.dir is None:
        parser.error("--dir or --executor-fd is required")
    return worker_main(args.dir, args.orphan_timeout_s, args.boot_delay_s)


if __name__ == "__main__":
    sys.exit(main())
