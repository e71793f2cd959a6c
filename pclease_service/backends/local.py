"""A backend whose contexts are Polars worker processes on this machine.

Each context is one ``python -m pclease_service.backends.local_worker`` process (see that module for
the worker, its executor and the wire protocol), in its own session, with a scrubbed
environment: only PATH, LANG/LC_*, TMPDIR and HOME pass through, plus POLARS_MAX_THREADS
from the profile and a PYTHONPATH that points at this code. Service secrets
(``POLARS_CLOUD_CLIENT_SECRET``, ``PCLEASE_*``) never reach a worker.

Everything about a worker lives in ``state_dir/workers/<context_id>/`` (mode 0700)::

    meta.json      what was asked for: context_id, profile, labels, cpus, memory_gb,
                   concurrent_queries (the worker's executors)
    authkey        32 random bytes (0600), the only credential for the socket; never logged
    process.json   the handle, written as soon as the worker is launched
    worker.log     the worker's and its executor's stdout and stderr

The handle is ``{"pid": int, "proc_start": int, "dir": str}``; ``proc_start`` is field 22 of
``/proc/<pid>/stat`` and tells a live worker from a process that reused its pid. Because the
handle and the directory are all there is, a new ``LocalBackend`` on the same ``state_dir``
(a restarted service) can list, poll and stop workers an earlier one started.

Queries (:meth:`LocalBackend.execute`) go to the worker's ``query`` op on a connection of
their own while they run, which stays open until the outcome arrives; afterwards it is
kept open for the next query (see ``_Connections``), so a query does not pay for a new
connection and its handshake. Cancelling the awaiting task shuts that connection down
(it is not reused); the worker sees it end, kills the executor running the query and
starts a fresh one, so the context stays usable. What a query may touch and how it runs is
in ``local_worker``, ``local_executor`` and ``pclease_service.plans``.

Exceptions::

    BackendError    launching failed, a handle is unusable, or a worker cannot be reached
                    (a query that fails is an outcome, not an exception)
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Connection,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pclease_service.backends.base import (
    Backend,
    Capabilities,
    ContextSpec,
    Handle,
    Observation,
    Observed,
    Phase,
    QueryOutcome,
    QuerySpec,
)
from pclease_service.backends.local_wire import (
    AUTHKEY_NAME,
    EXIT_ORPHANED,
    IDLE_CONNECTION_TIMEOUT_S,
    LOG_NAME,
    META_NAME,
    describe_exit,
    recv_json,
    send_json,
    set_io_timeout,
    socket_address,
)
from pclease_service.errors import BackendError

if TYPE_CHECKING:
    from pclease_service.config import Profile

PROCESS_NAME = "process.json"
PING_TIMEOUT_S = 2.0
STOP_GRACE_S = 5.0
TERM_GRACE_S = 2.0
# The time a query may take on top of its own timeout (the worker enforces that one) for
# shipping the plan and counting the rows of its output.
QUERY_MARGIN_S = 30.0
# AF_UNIX paths are limited to 108 bytes including the terminating NUL.

_ENV_PASSTHROUGH = frozenset({"PATH", "LANG", "TMPDIR", "HOME"})
_CONTEXT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# The directory holding the ``pclease_service`` package, so that
# ``-m pclease_service.backends.local_worker``
# resolves in a worker whose environment has been scrubbed.
_CODE_ROOT = Path(__file__).resolve().parents[2]


class _NotAnswering(Exception):
    """The worker's socket is missing or does not answer (yet)."""


@dataclass(frozen=True)
class _Ref:
    pid: int
    proc_start: int
    dir: Path

    def as_handle(self) -> dict[str, Any]:
        return {"pid": self.pid, "proc_start": self.proc_start, "dir": str(self.dir)}


# -- children ------------------------------------------------------------------------------
# The workers this OS process spawned, keyed by (pid, proc_start). Children belong to the
# process, not to a backend instance: any instance in this process reaps them and reads
# their exit status, and nothing is left as a zombie.
_children: dict[tuple[int, int], subprocess.Popen[bytes]] = {}
_children_lock = threading.Lock()


def _child(ref: _Ref) -> subprocess.Popen[bytes] | None:
    with _children_lock:
        return _children.get((ref.pid, ref.proc_start))


def _forget_child(ref: _Ref) -> None:
    with _children_lock:
        _children.pop((ref.pid, ref.proc_start), None)


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, or None if there is none."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses; everything after the last ")" is
    # space-separated, starting at field 3 (state). Field 22 is the start time.
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _alive(ref: _Ref) -> bool:
    child = _child(ref)
    if child is not None and child.poll() is not None:
        return False
    stat = _proc_stat(ref.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[1] == ref.proc_start


def _wait_gone(ref: _Ref, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(ref):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _describe_exit(code: int) -> str:
    if code == EXIT_ORPHANED:
        return f"code {code} (it heard nothing from the service for its orphan timeout)"
    return describe_exit(code)


def _last_log_line(directory: Path) -> str | None:
    try:
        with (directory / LOG_NAME).open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(f.tell() - 4096, 0))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln]
    return lines[-1][:300] if lines else None


def _worker_environment(cpus: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _ENV_PASSTHROUGH or k.startswith("LC_")}
    env["PYTHONPATH"] = str(_CODE_ROOT)
    if cpus:
        env["POLARS_MAX_THREADS"] = str(cpus)
    return env


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_json_atomically(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


# -- talking to a worker ---------------------------------------------------------------------
class _Abort:
    """Lets the event loop end a call that a thread is blocked in: shutting the socket down
    wakes the thread (EOF) and tells the worker its client has gone."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd: int | None = None
        self.aborted = False

    def attach(self, fd: int) -> None:
        with self._lock:
            self._fd = fd
            if self.aborted:
                self._shutdown()

    def detach(self) -> None:
        with self._lock:
            self._fd = None  # before the fd is closed, so it is never shut down once reused

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            if self._fd is not None:
                self._shutdown()

    def _shutdown(self) -> None:
        assert self._fd is not None
        sock = socket.socket(fileno=self._fd)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.detach()


class _Unsent(Exception):
    """A request could not be sent on a kept-open connection: the worker closed it
    before reading anything, so the request may be sent again on a new one."""


def _connect(directory: Path, timeout_s: float) -> Connection:
    """A new authenticated connection to the worker in ``directory``. Raises
    _NotAnswering or BackendError."""
    try:
        authkey = (directory / AUTHKEY_NAME).read_bytes()
    except OSError as exc:
        raise _NotAnswering(f"cannot read the worker's authkey: {exc.strerror}") from exc
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout_s)
        sock.connect(socket_address(directory))
        sock.setblocking(True)
        set_io_timeout(sock.fileno(), timeout_s)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        sock.close()
        raise _NotAnswering("its socket is not listening yet") from exc
    except OSError as exc:
        sock.close()
        raise _NotAnswering(f"cannot connect to its socket: {exc}") from exc
    conn = Connection(sock.detach())
    try:
        answer_challenge(conn, authkey)
        deliver_challenge(conn, authkey)
    except AuthenticationError as exc:
        conn.close()
        raise BackendError(
            f"the worker in {directory} rejected the authkey in its directory; "
            "stop the context and start a new one"
        ) from exc
    except (BlockingIOError, TimeoutError) as exc:
        conn.close()
        raise _NotAnswering(f"no answer within {timeout_s:g} s") from exc
    except (EOFError, OSError, ValueError) as exc:
        conn.close()
        raise _NotAnswering(f"the connection broke: {type(exc).__name__}: {exc}") from exc
    return conn


def _exchange(
    conn: Connection,
    request: Mapping[str, Any],
    payload: bytes | None,
    timeout_s: float,
    abort: _Abort | None = None,
    *,
    kept: bool = False,
) -> tuple[dict[str, Any], bytes | None]:
    """One request and its reply on an open connection. Raises _NotAnswering, or _Unsent
    when ``kept`` (a connection kept open since an earlier request) turns out closed."""
    set_io_timeout(conn.fileno(), timeout_s)
    if abort is not None:
        abort.attach(conn.fileno())
    try:
        try:
            send_json(conn, request)
            if payload is not None:
                conn.send_bytes(payload)
        except (BrokenPipeError, ConnectionResetError) as exc:
            # On a Unix socket, writing to a connection its peer has closed fails at once:
            # the worker has read none of this request.
            if kept:
                raise _Unsent(str(exc)) from exc
            raise
        reply = recv_json(conn)
        data = conn.recv_bytes() if reply.get("payload") else None
    except (BlockingIOError, TimeoutError) as exc:
        raise _NotAnswering(f"no answer within {timeout_s:g} s") from exc
    except (EOFError, OSError, ValueError) as exc:
        raise _NotAnswering(f"the connection broke: {type(exc).__name__}: {exc}") from exc
    finally:
        if abort is not None:
            abort.detach()
    return reply, data


def _call(
    directory: Path,
    request: Mapping[str, Any],
    payload: bytes | None,
    timeout_s: float,
    abort: _Abort | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    """One request on a fresh connection. Raises _NotAnswering or BackendError."""
    conn = _connect(directory, timeout_s)
    try:
        return _exchange(conn, request, payload, timeout_s, abort)
    finally:
        conn.close()


class _Connections:
    """Authenticated connections to workers, kept open between queries so that a query
    does not pay for a new connection and its HMAC handshake.

    A query takes a connection of its own (one request at a time on each: the worker
    reads a connection's next request only after answering the last) and gives it back
    once it has read the whole reply. A connection that broke, was aborted (a cancelled
    query) or went unused for half the worker's idle timeout is closed instead; so is
    one the worker closed meanwhile, which shows as readable (EOF) when taken.
    """

    #: Idle connections kept per worker: enough for its concurrent queries.
    MAX_IDLE = 8
    KEEP_S = IDLE_CONNECTION_TIMEOUT_S / 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: dict[_Ref, list[tuple[Connection, float]]] = {}

    def take(self, ref: _Ref) -> Connection | None:
        while True:
            with self._lock:
                self._prune()
                idle = self._idle.get(ref)
                if not idle:
                    return None
                conn, _ = idle.pop()
            try:
                broken = conn.poll(0)  # nothing may arrive between requests but an EOF
            except (OSError, ValueError):
                broken = True
            if not broken:
                return conn
            conn.close()

    def give_back(self, ref: _Ref, conn: Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(ref, [])
            if len(idle) < self.MAX_IDLE:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def drop(self, ref: _Ref) -> None:
        with self._lock:
            idle = self._idle.pop(ref, [])
        for conn, _ in idle:
            conn.close()

    def close(self) -> None:
        with self._lock:
            idle = [entry for entries in self._idle.values() for entry in entries]
            self._idle.clear()
        for conn, _ in idle:
            conn.close()

    def _prune(self) -> None:
        oldest = time.monotonic() - self.KEEP_S
        for ref in list(self._idle):
            kept = []
            for conn, since in self._idle[ref]:
                if since < oldest:
                    conn.close()
                else:
                    kept.append((conn, since))
            if kept:
                self._idle[ref] = kept
            else:
                del self._idle[ref]


class LocalBackend(Backend):
    """Contexts as local worker processes; see the module docstring for the layout."""

    kind = "local"
    capabilities = Capabilities(stop_on_shutdown=True, list_is_cheap=True, hosted=True)

    def __init__(
        self, state_dir: Path, *, orphan_timeout_s: float = 120.0, python: str = sys.executable
    ) -> None:
        self.state_dir = Path(state_dir).resolve()  # workers run in their own directory
        self.workers_dir = self.state_dir / "workers"
        self.orphan_timeout_s = orphan_timeout_s
        self.python = python
        self._starting: set[Path] = set()
        self._connections = _Connections()

    # -- Backend ----------------------------------------------------------------------------
    def context_options(self, profile: Profile) -> Mapping[str, Any]:
        return {**profile.local.model_dump(), "concurrent_queries": profile.concurrent_queries}

    async def start(self, spec: ContextSpec) -> Handle:
        return await asyncio.to_thread(self._start, spec)

    async def status(self, handle: Handle) -> Observation:
        return await asyncio.to_thread(lambda: self._status(self._ref(handle)))

    async def stop(self, handle: Handle) -> None:
        await asyncio.to_thread(lambda: self._stop(self._ref(handle)))

    async def list(self) -> list[Observed]:
        return await asyncio.to_thread(self._list)

    async def close(self) -> None:
        self._connections.close()

    def reaches(self, handle: Handle) -> bool:
        """A worker is reachable from any process that shares this ``state_dir`` (the
        replicas of one machine): its socket and authkey are in its directory."""
        try:
            ref = self._ref(handle)
        except BackendError:
            return False
        return (ref.dir / AUTHKEY_NAME).exists()

    # -- beyond the interface -----------------------------------------------------------------
    async def ping(self, handle: Handle) -> dict[str, Any]:
        """The worker's ping reply (pid, polars_version, threads, memory_gb, uptime_s,
        executor_pid). Raises BackendError if it does not answer."""
        return await asyncio.to_thread(self._ping, handle)

    async def execute(self, handle: Handle, query: QuerySpec) -> QueryOutcome:
        """Run ``query`` on the context's worker (see the module docstring of
        ``local_worker`` for the checks and how each target runs). A context runs as many
        queries at once as its profile's ``concurrent_queries`` (one executor each); time a
        query spends waiting for a free executor counts against ``timeout_s``. Raises
        BackendError only if the worker cannot be reached."""
        if query.distributed is not None:  # the service refuses these at submission
            return QueryOutcome(
                ok=False,
                error_type="InvalidQuery",
                error_message="the local backend runs every query on one node; submit it "
                "without distributed",
            )
        ref = self._ref(handle)
        request = {
            "op": "query",
            "query_id": query.query_id,
            "target": query.target.value,
            "result_path": query.result_path,
            "engine": query.engine,
            "timeout_s": query.timeout_s,
            "max_result_bytes": query.max_result_bytes,
            "allow_python_udfs": query.allow_python_udfs,
            "data_roots": list(query.data_roots),
            "denied_paths": list(query.denied_paths),
        }
        abort = _Abort()
        try:
            reply = await asyncio.to_thread(self._query, ref, request, query.plan, abort)
        except asyncio.CancelledError:
            abort.abort()
            raise
        if reply.get("ok"):
            return QueryOutcome(
                ok=True,
                rows=reply.get("rows"),
                result_bytes=reply.get("result_bytes"),
                output=reply.get("output"),
            )
        error = reply.get("error") or {}
        return QueryOutcome(
            ok=False,
            error_type=str(error.get("type", "Unknown")),
            error_message=str(error.get("message", "")),
        )

    # -- implementation (blocking, always called in a thread) ---------------------------------
    def _ping(self, handle: Handle) -> dict[str, Any]:
        ref = self._ref(handle)
        try:
            reply, _ = _call(ref.dir, {"op": "ping"}, None, PING_TIMEOUT_S)
        except _NotAnswering as exc:
            raise BackendError(f"the local worker {ref.pid} does not answer: {exc}") from exc
        return reply

    def _query(
        self, ref: _Ref, request: Mapping[str, Any], plan: bytes, abort: _Abort
    ) -> dict[str, Any]:
        timeout_s = float(request["timeout_s"]) + QUERY_MARGIN_S
        try:
            conn = self._connections.take(ref)
            if conn is not None:
                try:
                    return self._query_on(ref, conn, request, plan, timeout_s, abort, kept=True)
                except _Unsent:
                    pass  # closed by the worker meanwhile: the request goes on a new one
            conn = _connect(ref.dir, timeout_s)
            return self._query_on(ref, conn, request, plan, timeout_s, abort)
        except _NotAnswering as exc:
            state = "does not answer" if _alive(ref) else "is not running"
            raise BackendError(
                f"the local worker {ref.pid} {state} ({exc}); check the context's status"
            ) from exc

    def _query_on(
        self,
        ref: _Ref,
        conn: Connection,
        request: Mapping[str, Any],
        plan: bytes,
        timeout_s: float,
        abort: _Abort,
        *,
        kept: bool = False,
    ) -> dict[str, Any]:
        answered = False
        try:
            reply, _ = _exchange(conn, request, plan, timeout_s, abort, kept=kept)
            answered = True
            return reply
        finally:
            if answered and not abort.aborted:
                self._connections.give_back(ref, conn)
            else:
                conn.close()

    def _ref(self, handle: Handle) -> _Ref:
        try:
            ref = _Ref(int(handle["pid"]), int(handle["proc_start"]), Path(handle["dir"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"not a local backend handle: {dict(handle)!r}") from exc
        if ref.dir.parent.resolve() != self.workers_dir.resolve():
            raise BackendError(
                f"the handle points at {ref.dir}, outside this backend's {self.workers_dir}; "
                "was state_dir changed while contexts were running?"
            )
        return ref

    def _start(self, spec: ContextSpec) -> Handle:
        if not _CONTEXT_ID.fullmatch(spec.context_id):
            raise BackendError(
                f"context id {spec.context_id!r} cannot name a worker directory; use letters, "
                "digits, '.', '_' and '-' only"
            )
        directory = self.workers_dir / spec.context_id
        self.workers_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if directory.exists():
            existing = self._read_ref(directory)
            if existing is not None and _alive(existing):
                raise BackendError(
                    f"a local worker (pid {existing.pid}) already runs context "
                    f"{spec.context_id}; stop it before starting it again"
                )
            shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(mode=0o700)
        self._starting.add(directory)
        try:
            return self._launch(spec, directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            self._starting.discard(directory)

    def _launch(self, spec: ContextSpec, directory: Path) -> Handle:
        _write_private(directory / AUTHKEY_NAME, secrets.token_bytes(32))
        meta = {
            "context_id": spec.context_id,
            "profile": spec.profile,
            "labels": dict(spec.labels),
            "cpus": spec.cpus,
            "memory_gb": spec.memory_gb,
            # One executor per query the context runs at once.
            "concurrent_queries": int(spec.options.get("concurrent_queries") or 1),
        }
        _write_json_atomically(directory / META_NAME, meta)
        argv = [
            self.python,
            "-m",
            "pclease_service.backends.local_worker",
            "--dir",
            str(directory),
            "--orphan-timeout-s",
            repr(float(self.orphan_timeout_s)),
        ]
        boot_delay_s = float(spec.options.get("boot_delay_s", 0.0))
        if boot_delay_s > 0:
            argv += ["--boot-delay-s", repr(boot_delay_s)]
        with (directory / LOG_NAME).open("ab") as log:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=_worker_environment(spec.cpus),
                    cwd=directory,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise BackendError(
                    f"could not launch a local worker with python {self.python!r}: "
                    f"{exc.strerror or exc}; check the local backend's python setting"
                ) from exc
        # The child stays a zombie until we reap it, so its stat is readable even if it
        # has already died.
        stat = _proc_stat(proc.pid)
        ref = _Ref(proc.pid, stat[1] if stat else 0, directory)
        with _children_lock:
            _children[(ref.pid, ref.proc_start)] = proc
        handle = ref.as_handle()
        _write_json_atomically(directory / PROCESS_NAME, handle)
        return handle

    def _read_ref(self, directory: Path) -> _Ref | None:
        try:
            return self._ref(json.loads((directory / PROCESS_NAME).read_text()))
        except (OSError, ValueError, BackendError):
            return None

    def _gone(self, ref: _Ref) -> Observation:
        child = _child(ref)
        code = None
        if child is not None:
            # A killed multi-threaded process shows as a zombie a moment before the kernel
            # lets us reap it, so give the exit status that moment.
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = child.wait(timeout=TERM_GRACE_S)
        if code is not None:
            message = f"worker process exited with {_describe_exit(code)}"
            last = _last_log_line(ref.dir)
            # A Python traceback ends with the exception; a signal leaves nothing useful.
            if code > 0 and code != EXIT_ORPHANED and last:
                message += f"; last log line: {last}"
            return Observation(Phase.FAILED, message)
        if not ref.dir.exists():
            return Observation(Phase.STOPPED, "the worker was stopped and its directory removed")
        return Observation(Phase.FAILED, "worker process is gone")

    def _status(self, ref: _Ref) -> Observation:
        if not _alive(ref):
            return self._gone(ref)
        try:
            _call(ref.dir, {"op": "ping"}, None, PING_TIMEOUT_S)
        except _NotAnswering as exc:
            if not _alive(ref):
                return self._gone(ref)
            return Observation(Phase.STARTING, f"worker is not answering yet: {exc}")
        except BackendError as exc:
            # Alive but slow to answer (a loaded machine, a busy executor): not a failure.
            # Only a process that is gone is reported failed.
            if not _alive(ref):
                return self._gone(ref)
            return Observation(Phase.STARTING, f"worker did not answer a ping: {exc}")
        return Observation(Phase.RUNNING)

    def _stop(self, ref: _Ref) -> None:
        self._connections.drop(ref)
        if _alive(ref):
            try:
                _call(ref.dir, {"op": "stop"}, None, PING_TIMEOUT_S)
                asked = True
            except (_NotAnswering, BackendError):
                asked = False  # still booting, or hung: no point in waiting for it
            if not (asked and _wait_gone(ref, STOP_GRACE_S)):
                self._signal(ref, signal.SIGTERM)
                if not _wait_gone(ref, TERM_GRACE_S):
                    # The whole session: the worker and its executor.
                    self._signal(ref, signal.SIGKILL, group=True)
                    if not _wait_gone(ref, TERM_GRACE_S):
                        raise BackendError(
                            f"the local worker {ref.pid} survived SIGKILL; stop it again later"
                        )
        child = _child(ref)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=TERM_GRACE_S)
            _forget_child(ref)
        shutil.rmtree(ref.dir, ignore_errors=True)

    @staticmethod
    def _signal(ref: _Ref, signum: int, *, group: bool = False) -> None:
        if not _alive(ref):  # never signal a process that merely reused the pid
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(ref.pid, signum)
            else:
                os.kill(ref.pid, signum)

    def _list(self) -> builtins.list[Observed]:
        found: builtins.list[Observed] = []
        for meta_path in sorted(self.workers_dir.glob(f"*/{META_NAME}")):
            directory = meta_path.parent
            if directory in self._starting:
                continue
            ref = self._read_ref(directory)
            if ref is None:
                # A start that died before recording its process; any worker it launched
                # exits by its orphan timeout, so the directory can go once that has passed.
                if time.time() - directory.stat().st_mtime > self.orphan_timeout_s + 60:
                    shutil.rmtree(directory, ignore_errors=True)
                continue
            if not _alive(ref):
                shutil.rmtree(directory, ignore_errors=True)
                continue
            try:
                context_id = json.loads(meta_path.read_text()).get("context_id")
            except (OSError, ValueError):
                context_id = directory.name
            found.append(Observed(ref.as_handle(), self._status(ref).phase, context_id))
        return found
