"""``PcleaseClient``: the synchronous client of the pclease v1 API.

A method per route, each a :class:`~pclease_client.calls.Call` (built in
:mod:`pclease_client.calls`, read into :mod:`pclease_client.models`) sent through
``httpx.Client`` with the retries of a :class:`~pclease_client.calls.RetryPolicy`.
:meth:`PcleaseClient.lease` is the convenient way in: it leases, waits for the context,
heartbeats and releases (see :class:`~pclease_client.lease.Lease`).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from pclease_client import calls
from pclease_client.calls import Call, RetryPolicy
from pclease_client.errors import QueryFailed, RequestFailed
from pclease_client.lease import Lease, LeaseRef, QueryProgress
from pclease_client.models import ContextInfo, EventInfo, LeaseInfo, ProfileInfo, QueryInfo
from pclease_client.plans import Submission
from pclease_client.states import ContextState, LeaseState, QueryState
from pclease_client.watchdog import Watchdog

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("pclease_client")

T = TypeVar("T")
#: The longest one long poll waits for news (the service allows 60 s).
WATCH_S = 20.0


class PcleaseClient:
    """Talks to one pclease service with one token.

    Every call retries transient failures (lost connections, 502/503/504) with
    exponential backoff (a query submission only when it was never sent); lease creation
    carries an ``Idempotency-Key`` so a retried request never leases twice. Error answers
    raise the classes of :mod:`pclease_client.errors`; a call that never got an answer
    raises :class:`~pclease_client.errors.RequestFailed`.

    ``transport`` replaces httpx's network transport, e.g. with
    :meth:`pclease_client.testing.FakePclease.transport` in tests.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        verify: bool | str = True,
        retries: int = 4,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry_policy = RetryPolicy(retries=retries, backoff_s=backoff_s)
        self._verify = verify
        self._token = token
        self._transport = transport
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": "pclease-client"}
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            # Long polls wait up to a minute on the service: reads may take longer.
            timeout=httpx.Timeout(timeout_s, read=max(timeout_s, 90.0)),
            verify=verify,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PcleaseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, call: Call[T], *, timeout_s: float | None = None) -> T:
        """Send ``call`` (retrying as :attr:`retry_policy` says) and read its answer.

        ``timeout_s`` bounds each attempt instead of the client's timeout."""
        options: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        attempt = 0
        while True:
            attempt += 1
            try:
                response = self._http.request(
                    call.method, call.path, **call.request_args(), **options
                )
            except httpx.TransportError as exc:
                delay = self.retry_policy.delay_s(call, attempt, error=exc)
                if delay is None:
                    raise RequestFailed(
                        call.method, call.url(self.base_url), str(exc) or type(exc).__name__
                    ) from exc
                why = str(exc) or type(exc).__name__
            else:
                delay = self.retry_policy.delay_s(
                    call,
                    attempt,
                    status=response.status_code,
                    draining=calls.is_draining(response),
                )
                if delay is None:
                    return call.answer(response)
                why = f"answered {response.status_code}"
            log.warning(
                "pclease %s %s failed (%s); retrying in %.1f s", call.method, call.path, why, delay
            )
            time.sleep(delay)

    def _stream(self, call: Call[Any], body: Callable[[httpx.Response], T]) -> T:
        """Like :meth:`send`, but a successful answer is read as it arrives, by ``body``;
        a transfer that breaks is retried (from the start) as the policy says."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._http.stream(call.method, call.path, **call.request_args()) as response:
                    if response.is_success:
                        return body(response)
                    response.read()
                    delay = self.retry_policy.delay_s(
                        call,
                        attempt,
                        status=response.status_code,
                        draining=calls.is_draining(response),
                    )
                    if delay is None:
                        call.answer(response)  # raises the error answer's exception
                        raise AssertionError("an error answer was read as a success")
                    why = f"answered {response.status_code}"
            except httpx.TransportError as exc:
                delay = self.retry_policy.delay_s(call, attempt, error=exc)
                if delay is None:
                    raise RequestFailed(
                        call.method, call.url(self.base_url), str(exc) or type(exc).__name__
                    ) from exc
                why = str(exc) or type(exc).__name__
            log.warning(
                "pclease %s %s failed (%s); retrying in %.1f s", call.method, call.path, why, delay
            )
            time.sleep(delay)

    # -- profiles --------------------------------------------------------------------------

    def list_profiles(self) -> list[ProfileInfo]:
        return self.send(calls.list_profiles())

    # -- leases ----------------------------------------------------------------------------

    def create_lease(
        self,
        profile: str,
        *,
        holder: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> LeaseInfo:
        """A new lease, ``pending`` until its context runs (see :meth:`lease`, which waits
        and heartbeats). ``wait_s``: queue that long for capacity instead of failing at
        once with :class:`~pclease_client.errors.CapacityExhausted`."""
        return self.send(
            calls.create_lease(
                profile,
                holder=holder,
                ttl_s=ttl_s,
                wait_s=wait_s,
                idempotency_key=idempotency_key,
            )
        )

    def get_lease(
        self, lease_id: str, *, wait_s: float = 0, while_state: LeaseState | None = None
    ) -> LeaseInfo:
        """The lease; with ``wait_s``, as soon as its state leaves ``while_state``."""
        return self.send(calls.get_lease(lease_id, wait_s=wait_s, while_state=while_state))

    def list_leases(
        self,
        *,
        state: Iterable[LeaseState] | None = None,
        context_id: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        limit: int | None = None,
    ) -> list[LeaseInfo]:
        """Leases (newest first) this token may see."""
        return self.send(
            calls.list_leases(
                state=state, context_id=context_id, dag_id=dag_id, run_id=run_id, limit=limit
            )
        )

    def heartbeat(self, lease_id: str) -> LeaseInfo:
        return self.send(calls.heartbeat(lease_id))

    def release(self, lease_id: str) -> LeaseInfo:
        """Release the lease (repeating it answers the same released lease)."""
        return self.send(calls.release(lease_id))

    def release_holder(
        self,
        dag_id: str,
        run_id: str,
        *,
        task_id: str | None = None,
        map_index: int | None = None,
        timeout_s: float | None = None,
    ) -> list[LeaseInfo]:
        """Release every live lease of a DAG run, or of one of its task instances (the
        caller's own unless the token is an admin's); returns those it released."""
        return self.send(
            calls.release_holder(dag_id, run_id, task_id=task_id, map_index=map_index),
            timeout_s=timeout_s,
        )

    def release_once(self, lease_id: str, *, timeout_s: float = 3.0) -> LeaseInfo:
        """One release attempt on a connection of its own, with a short timeout.

        For signal handlers (Airflow's ``on_kill``): the interrupted thread may be inside
        this client's connection pool, whose lock is not reentrant, and the process may be
        killed within seconds, so there is no time for retries.
        """
        return self._send_once(calls.release(lease_id), timeout_s)

    def release_holder_once(
        self,
        dag_id: str,
        run_id: str,
        *,
        task_id: str | None = None,
        map_index: int | None = None,
        timeout_s: float = 3.0,
    ) -> list[LeaseInfo]:
        """:meth:`release_holder` in one attempt on a connection of its own (see
        :meth:`release_once`): for a lease whose creation was interrupted before its id
        reached the caller."""
        call = calls.release_holder(dag_id, run_id, task_id=task_id, map_index=map_index)
        return self._send_once(call, timeout_s)

    def _send_once(self, call: Call[T], timeout_s: float) -> T:
        with httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=timeout_s,
            verify=self._verify,
            transport=self._transport,
        ) as http:
            try:
                response = http.request(call.method, call.path, **call.request_args())
            except httpx.TransportError as exc:
                raise RequestFailed(call.method, call.url(self.base_url), str(exc)) from exc
            return call.answer(response)

    @contextmanager
    def lease(
        self,
        profile: str,
        *,
        holder: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
        wait_s: float | None = None,
        start_timeout_s: float = 900.0,
        labels: Mapping[str, str] | None = None,
        polars_errors: bool = False,
        on_progress: Callable[[str], None] | None = None,
        on_created: Callable[[Lease], None] | None = None,
        watchdog: bool = True,
    ) -> Iterator[Lease]:
        """Lease ``profile``, wait until its context runs, heartbeat, release on exit.

        ``labels`` go with every query run on the lease; with ``polars_errors`` a failed
        query raises Polars' own exception (``ColumnNotFoundError``...) rather than
        :class:`~pclease_client.errors.QueryFailed`. ``on_created`` gets the lease as soon
        as it exists, before the wait for its context: whoever may have to release it early
        (a signal handler) can hold it from then on. With ``watchdog`` (the default) the
        lease is also released the moment this process dies, even by SIGKILL (see
        :mod:`pclease_client.watchdog`).
        """
        info = self.create_lease(profile, holder=holder, ttl_s=ttl_s, wait_s=wait_s)
        lease = Lease(
            self, info, labels=labels, polars_errors=polars_errors, on_progress=on_progress
        )
        try:
            if watchdog:
                lease.guard_with_watchdog()
            if on_created is not None:
                on_created(lease)
            lease.wait_active(start_timeout_s)
            lease.start_heartbeats()
            yield lease
        finally:
            lease.close()

    def attach(
        self,
        lease: str | LeaseInfo,
        *,
        labels: Mapping[str, str] | None = None,
        polars_errors: bool = False,
        on_progress: Callable[[str], None] | None = None,
    ) -> Lease:
        """A handle on a lease someone else holds (a setup task, another process): it runs
        queries on the lease but neither heartbeats nor releases it."""
        info = self.get_lease(lease) if isinstance(lease, str) else lease
        return Lease(
            self,
            info,
            owned=False,
            labels=labels,
            polars_errors=polars_errors,
            on_progress=on_progress,
        )

    def hold(
        self,
        lease: LeaseInfo,
        *,
        labels: Mapping[str, str] | None = None,
        polars_errors: bool = False,
        on_progress: Callable[[str], None] | None = None,
    ) -> Lease:
        """A handle that owns ``lease`` (made with :meth:`create_lease`): it releases the
        lease on :meth:`~pclease_client.lease.Lease.close`. Waiting for its context and
        heartbeating are the caller's to start (what :meth:`lease` does for you)."""
        return Lease(
            self, lease, labels=labels, polars_errors=polars_errors, on_progress=on_progress
        )

    def resume(
        self,
        ref: LeaseRef,
        *,
        on_progress: Callable[[str], None] | None = None,
    ) -> Lease:
        """Take over a lease another holder handed off (``Lease.handoff``, or the
        asynchronous client's): an owned handle on it as the service has it now. Waiting
        for its context and heartbeating are the caller's to start."""
        return self.hold(
            self.get_lease(ref.lease_id),
            labels=ref.labels,
            polars_errors=ref.polars_errors,
            on_progress=on_progress,
        )

    def watchdog_for(self, lease_id: str, *, give_up_after_s: float) -> Watchdog | None:
        """A :class:`Watchdog` that releases ``lease_id`` with this client's token when
        this process dies."""
        return Watchdog.start(
            calls.release(lease_id).url(self.base_url),
            self._token,
            verify=self._verify,
            give_up_after_s=give_up_after_s,
        )

    # -- contexts and events ---------------------------------------------------------------

    def list_contexts(
        self,
        *,
        state: Iterable[ContextState] | None = None,
        profile: str | None = None,
        limit: int | None = None,
    ) -> list[ContextInfo]:
        return self.send(calls.list_contexts(state=state, profile=profile, limit=limit))

    def get_context(self, context_id: str) -> ContextInfo:
        return self.send(calls.get_context(context_id))

    def stop_context(self, context_id: str) -> ContextInfo:
        """Admin: revoke the context's leases and stop it."""
        return self.send(calls.stop_context(context_id))

    def list_events(
        self,
        *,
        context_id: str | None = None,
        lease_id: str | None = None,
        after_id: int | None = None,
        limit: int | None = None,
    ) -> list[EventInfo]:
        """The audit log, newest first (a lease token sees its own leases' history)."""
        return self.send(
            calls.list_events(
                context_id=context_id, lease_id=lease_id, after_id=after_id, limit=limit
            )
        )

    # -- queries ---------------------------------------------------------------------------

    def submit(self, lease_id: str, submission: Submission) -> QueryInfo:
        """Run a plan on the lease's context; answers at once (see :meth:`wait_query`)."""
        return self.send(calls.submit_query(lease_id, submission))

    def list_queries(self, lease_id: str) -> list[QueryInfo]:
        """The lease's queries."""
        return self.send(calls.list_lease_queries(lease_id))

    def get_query(self, query_id: str, *, wait_s: float = 0) -> QueryInfo:
        """The query; with ``wait_s``, as soon as it has finished."""
        return self.send(calls.get_query(query_id, wait_s=wait_s))

    def cancel_query(self, query_id: str) -> QueryInfo:
        return self.send(calls.cancel_query(query_id))

    def wait_query(
        self,
        query_id: str,
        *,
        timeout_s: float | None = None,
        on_progress: QueryProgress | None = None,
        check: Callable[[], None] | None = None,
    ) -> QueryInfo:
        """Follow a query until it ends; raise :class:`QueryFailed` unless it succeeded.

        ``check`` is called before each long poll and may raise to stop following (a lease
        that ended underneath the query); with ``timeout_s`` the query is cancelled when it
        has not finished in time."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_state: QueryState | None = None
        while True:
            if check is not None:
                check()
            query = self.get_query(query_id, wait_s=WATCH_S)
            if on_progress is not None and query.state is not last_state:
                on_progress(query)
            last_state = query.state
            if query.state is QueryState.SUCCEEDED:
                return query
            if query.state.is_terminal:
                raise QueryFailed.of(query)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel_query(query_id)
                raise QueryFailed(
                    query_id, "ClientTimeout", f"no result within {timeout_s:g} s; cancelled it"
                )

    def result_bytes(self, query_id: str) -> bytes:
        """A collect query's result as an Arrow IPC file, in memory (see
        :meth:`download_result` for a large one)."""
        return self.send(calls.query_result(query_id))

    def download_result(self, query_id: str, destination: str | os.PathLike[str]) -> int:
        """Stream a collect query's result (an Arrow IPC file) into the file
        ``destination``, never holding it in memory; returns its size in bytes."""

        def write(response: httpx.Response) -> int:
            with open(destination, "wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                return out.tell()

        return self._stream(calls.query_result(query_id), write)

    def result_frame(self, query_id: str) -> pl.DataFrame:
        """A collect query's result as a Polars DataFrame. A large result is streamed to
        a temporary file (in ``TMPDIR``) and read from there, so the client never holds
        the whole body and the frame at once."""
        import polars as pl

        def read(response: httpx.Response) -> pl.DataFrame:
            if not calls.spills(response):
                return pl.read_ipc(io.BytesIO(response.read()))
            with tempfile.NamedTemporaryFile(prefix="pclease-result-", suffix=".arrow") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                out.flush()
                return pl.read_ipc(out.name)

        return self._stream(calls.query_result(query_id), read)
