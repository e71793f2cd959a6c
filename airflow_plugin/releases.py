"""Release leases in the background, on behalf of the listener.

Listeners run inside Airflow's own loops: the DAG-run hooks in the scheduler, inside its
ORM session; the task-instance hooks in task processes, in the scheduler (for a task it
found dead) and in the API server (for a state set by hand). Nothing there may wait for
pclease or touch Airflow's session. So a listener only reads plain attributes of the run
or task instance and hands a :class:`ReleaseRequest` to :func:`releaser`; one daemon
thread per process takes requests off a bounded queue and, on that thread:

- resolves the connection the way Airflow resolves any connection in that process
  (environment variables, the configured secrets backend, the metastore); a metastore
  lookup opens a session of this thread's own (Airflow's sessions are thread-scoped),
  never the scheduler's;
- makes one request, with the connection's timeout and no retries;
- logs what failed, and goes on.

A full queue drops a request (with a warning) rather than block: leases left behind are
still ended by their task's watchdog or by their TTL. Before the process exits, whatever
is queued gets a few seconds to go out.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from airflow_plugin.hooks import PcleaseHook

log = logging.getLogger(__name__)

#: How many releases may wait; more are dropped (the lease TTL still ends them).
QUEUE_SIZE = 256
#: How long a process that exits waits for queued releases.
DRAIN_AT_EXIT_S = 3.0


@dataclass(frozen=True)
class ReleaseRequest:
    """Release the live leases of one DAG run, or of one of its task instances."""

    conn_id: str
    dag_id: str
    run_id: str
    task_id: str | None = None
    map_index: int | None = None
    why: str = ""
    #: Already resolved (in a task process, where only the calling thread may ask the
    #: supervisor for it); None: the worker thread resolves it.
    connection: Any = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        who = f"{self.dag_id}/{self.run_id}"
        if self.task_id is not None:
            who += f"/{self.task_id}"
            if self.map_index is not None and self.map_index >= 0:
                who += f"[{self.map_index}]"
        return who


class BackgroundReleaser:
    """A bounded queue of :class:`ReleaseRequest` and the one thread that works it off
    with ``release`` (default: :func:`release`)."""

    def __init__(
        self,
        *,
        maxsize: int = QUEUE_SIZE,
        release: Callable[[ReleaseRequest], object] | None = None,
    ) -> None:
        self._maxsize = maxsize
        self._release = release
        self._lock = threading.Lock()
        self._queue: queue.Queue[ReleaseRequest] = queue.Queue(maxsize)
        self._queued: set[ReleaseRequest] = set()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._drains_at_exit_in: int | None = None
        self.dropped = 0
        self.done = 0

    def submit(self, request: ReleaseRequest) -> bool:
        """Queue ``request`` (never blocks); False if it was dropped."""
        with self._lock:
            self._ensure_worker()
            if request in self._queued:
                return True  # the same release is already waiting
            try:
                self._queue.put_nowait(request)
            except queue.Full:
                self.dropped += 1
                log.warning(
                    "pclease: %d releases are waiting already; not releasing the leases of %s "
                    "(their TTL ends them)",
                    self._maxsize,
                    request.describe(),
                )
                return False
            self._queued.add(request)
        return True

    def drain(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the queue to empty; True if it did."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def _ensure_worker(self) -> None:
        if self._pid != os.getpid():
            # A forked child inherits the queue but not the thread: start afresh.
            self._queue = queue.Queue(self._maxsize)
            self._queued = set()
            self._thread = None
            self._pid = os.getpid()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="pclease-releaser", daemon=True)
            self._thread.start()
        if self._drains_at_exit_in != self._pid:
            atexit.register(self.drain, DRAIN_AT_EXIT_S)
            self._drains_at_exit_in = self._pid

    def _work(self) -> None:
        work = self._queue
        while True:
            request = work.get()
            with self._lock:
                self._queued.discard(request)
            try:
                (self._release or release)(request)
            except Exception:
                log.warning(
                    "pclease: releasing the leases of %s failed", request.describe(), exc_info=True
                )
            finally:
                self.done += 1
                work.task_done()


def release(request: ReleaseRequest) -> list[str]:
    """Release what ``request`` names, now, on this thread; returns the lease ids."""
    connection = request.connection or resolve_connection(request.conn_id)
    if connection is None:
        return []
    hook = PcleaseHook(request.conn_id, connection=connection, retries=0)
    try:
        released = hook.release_holder(
            request.dag_id,
            request.run_id,
            request.task_id,
            request.map_index,
            timeout_s=hook.settings.timeout_s,
        )
    except Exception as exc:
        log.warning(
            "pclease: could not release the leases of %s (%s): %s",
            request.describe(),
            request.why,
            exc,
        )
        return []
    finally:
        hook.close()
    if released:
        log.info(
            "pclease: released %s of %s (%s)", ", ".join(released), request.describe(), request.why
        )
    return released


def resolve_connection(conn_id: str) -> Any:
    """The connection ``conn_id`` as this process sees it, or None if it has none.

    Task SDK first (a task process asks its supervisor; a scheduler or API server walks
    the environment, the secrets backend and the metastore), then Airflow core's lookup,
    which older Airflow 3 releases need outside a task.
    """
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return PcleaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None
    except Exception as exc:
        log.debug("pclease: the Task SDK could not look up %r: %s", conn_id, exc)
    try:
        from airflow.models.connection import Connection

        return Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        return None
    except Exception as exc:
        log.warning("pclease: could not look up connection %r: %s", conn_id, exc)
        return None


def in_task_process() -> bool:
    """Whether this is a task process, whose connections come from its supervisor."""
    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    return getattr(runner, "SUPERVISOR_COMMS", None) is not None


_releaser = BackgroundReleaser()


def releaser() -> BackgroundReleaser:
    """This process's releaser."""
    return _releaser
