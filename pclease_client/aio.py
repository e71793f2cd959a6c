"""``AsyncPcleaseClient``: the asynchronous client of the pclease v1 API, for event loops
(an Airflow triggerer, an async service).

The same methods as :class:`~pclease_client.PcleaseClient`, the same requests (every one a
:class:`~pclease_client.calls.Call` of :mod:`pclease_client.calls`), the same retry policy,
answers (:mod:`pclease_client.models`) and exceptions (:mod:`pclease_client.errors`), sent
through ``httpx.AsyncClient``. :class:`AsyncLease` heartbeats from an asyncio task instead
of a thread::

    async with AsyncPcleaseClient("http://pclease:8040", token) as client:
        async with client.lease("large", holder={"dag_id": "etl"}) as lease:
            written = await lease.remote(lf).sink_parquet("s3://bucket/out.parquet")

Two things of the synchronous client have no asynchronous twin, because they belong to a
process rather than to an event loop: the watchdog that releases a lease when its process
dies, and ``release_once`` for signal handlers. A lease handed between holders travels as
a :class:`~pclease_client.lease.LeaseRef` (:meth:`AsyncLease.handoff`,
:meth:`AsyncPcleaseClient.resume`).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any, TypeVar

import httpx

from pclease_client import calls
from pclease_client.calls import Call, RetryPolicy
from pclease_client.client import WATCH_S
from pclease_client.errors import LeaseEnded, LeaseLost, QueryFailed, RequestFailed
from pclease_client.lease import HandleState, LeaseHandle, LeaseRef, QueryProgress
from pclease_client.models import ContextInfo, EventInfo, LeaseInfo, ProfileInfo, QueryInfo
from pclease_client.plans import Engine, Submission, Target, build_submission
from pclease_client.states import ContextState, LeaseState, QueryState

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger("pclease_client")

T = TypeVar("T")
#: Body bytes gathered before one write to a file (in a thread, off the event loop).
_WRITE_BATCH_BYTES = 4 * 1024 * 1024


async def _copy_body(response: httpx.Response, out: IO[bytes]) -> None:
    batch: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        batch.append(chunk)
        size += len(chunk)
        if size >= _WRITE_BATCH_BYTES:
            await asyncio.to_thread(out.write, b"".join(batch))
            batch, size = [], 0
    if batch:
        await asyncio.to_thread(out.write, b"".join(batch))


class AsyncPcleaseClient:
    """Talks to one pclease service with one token, asynchronously; see
    :class:`~pclease_client.PcleaseClient` for the retries and errors, which are the same.

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
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.retry_policy = RetryPolicy(retries=retries, backoff_s=backoff_s)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "User-Agent": "pclease-client"},
            # Long polls wait up to a minute on the service: reads may take longer.
            timeout=httpx.Timeout(timeout_s, read=max(timeout_s, 90.0)),
            verify=verify,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncPcleaseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, call: Call[T], *, timeout_s: float | None = None) -> T:
        """Send ``call`` (retrying as :attr:`retry_policy` says) and read its answer."""
        options: dict[str, Any] = {} if timeout_s is None else {"timeout": timeout_s}
        attempt = 0
        while True:
            attempt += 1
            try:
                response = await self._http.request(
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
                delay = self.retry_policy.delay_s(call, attempt, status=response.status_code)
                if delay is None:
                    return call.answer(response)
                why = f"answered {response.status_code}"
            log.warning(
                "pclease %s %s failed (%s); retrying in %.1f s", call.method, call.path, why, delay
            )
            await asyncio.sleep(delay)

    async def _stream(self, call: Call[Any], body: Callable[[httpx.Response], Awaitable[T]]) -> T:
        """Like :meth:`send`, but a successful answer is read as it arrives, by ``body``;
        a transfer that breaks is retried (from the start) as the policy says."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._http.stream(
                    call.method, call.path, **call.request_args()
                ) as response:
                    if response.is_success:
                        return await body(response)
                    await response.aread()
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
            await asyncio.sleep(delay)

    # -- profiles --------------------------------------------------------------------------

    async def list_profiles(self) -> list[ProfileInfo]:
        return await self.send(calls.list_profiles())

    # -- leases ----------------------------------------------------------------------------

    async def create_lease(
        self,
        profile: str,
        *,
        holder: Mapping[str, Any] | None = None,
        ttl_s: float | None = None,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
    ) -> LeaseInfo:
        return await self.send(
            calls.create_lease(
                profile,
                holder=holder,
                ttl_s=ttl_s,
                wait_s=wait_s,
                idempotency_key=idempotency_key,
            )
        )

    async def get_lease(
        self, lease_id: str, *, wait_s: float = 0, while_state: LeaseState | None = None
    ) -> LeaseInfo:
        return await self.send(calls.get_lease(lease_id, wait_s=wait_s, while_state=while_state))

    async def list_leases(
        self,
        *,
        state: Iterable[LeaseState] | None = None,
        context_id: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        limit: int | None = None,
    ) -> list[LeaseInfo]:
        return await self.send(
            calls.list_leases(
                state=state, context_id=context_id, dag_id=dag_id, run_id=run_id, limit=limit
            )
        )

    async def heartbeat(self, lease_id: str) -> LeaseInfo:
        return await self.send(calls.heartbeat(lease_id))

    async def release(self, lease_id: str) -> LeaseInfo:
        return await self.send(calls.release(lease_id))

    async def release_holder(
        self,
        dag_id: str,
        run_id: str,
        *,
        task_id: str | None = None,
        map_index: int | None = None,
        timeout_s: float | None = None,
    ) -> list[LeaseInfo]:
        return await self.send(
            calls.release_holder(dag_id, run_id, task_id=task_id, map_index=map_index),
            timeout_s=timeout_s,
        )

    @contextlib.asynccontextmanager
    async def lease(
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
    ) -> AsyncIterator[AsyncLease]:
        """Lease ``profile``, wait until its context runs, heartbeat, release on exit (see
        :meth:`PcleaseClient.lease <pclease_client.PcleaseClient.lease>`)."""
        info = await self.create_lease(profile, holder=holder, ttl_s=ttl_s, wait_s=wait_s)
        lease = AsyncLease(
            self, info, labels=labels, polars_errors=polars_errors, on_progress=on_progress
        )
        try:
            await lease.wait_active(start_timeout_s)
            lease.start_heartbeats()
            yield lease
        finally:
            # Shielded: a cancelled task still releases its lease.
            await asyncio.shield(lease.close())

    def attach(
        self,
        lease: LeaseInfo,
        *,
        labels: Mapping[str, str] | None = None,
        polars_errors: bool = False,
        on_progress: Callable[[str], None] | None = None,
    ) -> AsyncLease:
        """A handle on a lease someone else holds: it runs queries on the lease but neither
        heartbeats nor releases it."""
        return AsyncLease(
            self,
            lease,
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
    ) -> AsyncLease:
        """A handle that owns ``lease``: it releases the lease on :meth:`AsyncLease.close`."""
        return AsyncLease(
            self, lease, labels=labels, polars_errors=polars_errors, on_progress=on_progress
        )

    async def resume(
        self, ref: LeaseRef, *, on_progress: Callable[[str], None] | None = None
    ) -> AsyncLease:
        """Take over a lease another holder handed off (:meth:`AsyncLease.handoff`, or the
        synchronous ``Lease.handoff``): an owned handle on it, as the service has it now
        (a lease that ended meanwhile gives a handle that is lost already)."""
        info = await self.get_lease(ref.lease_id)
        return self.hold(
            info, labels=ref.labels, polars_errors=ref.polars_errors, on_progress=on_progress
        )

    # -- contexts and events ---------------------------------------------------------------

    async def list_contexts(
        self,
        *,
        state: Iterable[ContextState] | None = None,
        profile: str | None = None,
        limit: int | None = None,
    ) -> list[ContextInfo]:
        return await self.send(calls.list_contexts(state=state, profile=profile, limit=limit))

    async def get_context(self, context_id: str) -> ContextInfo:
        return await self.send(calls.get_context(context_id))

    async def stop_context(self, context_id: str) -> ContextInfo:
        return await self.send(calls.stop_context(context_id))

    async def list_events(
        self,
        *,
        context_id: str | None = None,
        lease_id: str | None = None,
        after_id: int | None = None,
        limit: int | None = None,
    ) -> list[EventInfo]:
        return await self.send(
            calls.list_events(
                context_id=context_id, lease_id=lease_id, after_id=after_id, limit=limit
            )
        )

    # -- queries ---------------------------------------------------------------------------

    async def submit(self, lease_id: str, submission: Submission) -> QueryInfo:
        return await self.send(calls.submit_query(lease_id, submission))

    async def list_queries(self, lease_id: str) -> list[QueryInfo]:
        return await self.send(calls.list_lease_queries(lease_id))

    async def get_query(self, query_id: str, *, wait_s: float = 0) -> QueryInfo:
        return await self.send(calls.get_query(query_id, wait_s=wait_s))

    async def cancel_query(self, query_id: str) -> QueryInfo:
        return await self.send(calls.cancel_query(query_id))

    async def wait_query(
        self,
        query_id: str,
        *,
        timeout_s: float | None = None,
        on_progress: QueryProgress | None = None,
        check: Callable[[], None] | None = None,
    ) -> QueryInfo:
        """Follow a query until it ends; raise :class:`QueryFailed` unless it succeeded
        (see :meth:`PcleaseClient.wait_query <pclease_client.PcleaseClient.wait_query>`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_state: QueryState | None = None
        while True:
            if check is not None:
                check()
            query = await self.get_query(query_id, wait_s=WATCH_S)
            if on_progress is not None and query.state is not last_state:
                on_progress(query)
            last_state = query.state
            if query.state is QueryState.SUCCEEDED:
                return query
            if query.state.is_terminal:
                raise QueryFailed.of(query)
            if deadline is not None and time.monotonic() > deadline:
                await self.cancel_query(query_id)
                raise QueryFailed(
                    query_id, "ClientTimeout", f"no result within {timeout_s:g} s; cancelled it"
                )

    async def result_bytes(self, query_id: str) -> bytes:
        return await self.send(calls.query_result(query_id))

    async def download_result(self, query_id: str, destination: str | os.PathLike[str]) -> int:
        """Stream a collect query's result into the file ``destination`` (written in a
        thread, a few MiB at a time); returns its size in bytes."""

        async def write(response: httpx.Response) -> int:
            out = await asyncio.to_thread(open, destination, "wb")
            try:
                await _copy_body(response, out)
                return int(await asyncio.to_thread(out.tell))
            finally:
                await asyncio.to_thread(out.close)

        return await self._stream(calls.query_result(query_id), write)

    async def result_frame(self, query_id: str) -> pl.DataFrame:
        """A collect query's result as a Polars DataFrame; a large one goes through a
        temporary file, as with :meth:`PcleaseClient.result_frame`. Polars reads it in a
        thread."""
        import polars as pl

        async def read(response: httpx.Response) -> pl.DataFrame:
            if not calls.spills(response):
                data = await response.aread()
                return await asyncio.to_thread(pl.read_ipc, io.BytesIO(data))
            # Closed (and so deleted) in a thread below, not by a with block on the loop.
            out = await asyncio.to_thread(
                lambda: tempfile.NamedTemporaryFile(prefix="pclease-result-", suffix=".arrow")  # noqa: SIM115
            )
            try:
                await _copy_body(response, out)
                await asyncio.to_thread(out.flush)
                return await asyncio.to_thread(pl.read_ipc, out.name)
            finally:
                await asyncio.to_thread(out.close)

        return await self._stream(calls.query_result(query_id), read)


class AsyncLease(LeaseHandle):
    """A lease held from an event loop: :class:`~pclease_client.lease.Lease`'s twin, whose
    heartbeats (and the long poll that notices the lease's end at once) run in an asyncio
    task started by :meth:`start_heartbeats`."""

    def __init__(
        self,
        client: AsyncPcleaseClient,
        info: LeaseInfo,
        *,
        owned: bool = True,
        labels: Mapping[str, str] | None = None,
        polars_errors: bool = False,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self._beating: asyncio.Task[None] | None = None
        super().__init__(
            info, owned=owned, labels=labels, polars_errors=polars_errors, on_progress=on_progress
        )

    @property
    def beating(self) -> bool:
        """Whether the heartbeat task runs."""
        return self._beating is not None and not self._beating.done()

    async def wait_active(self, timeout_s: float) -> None:
        """Wait until the lease's context runs, heartbeating meanwhile; raise
        :class:`LeaseLost` if it ends instead or ``timeout_s`` passes (then it is released)."""
        deadline = time.monotonic() + timeout_s
        while self._handle is HandleState.WAITING and self.info.state is LeaseState.PENDING:
            left = deadline - time.monotonic()
            if left <= 0:
                await self.close(f"its context was not running after {timeout_s:g} s")
                raise LeaseLost(
                    self.id, LeaseState.PENDING, f"context not running after {timeout_s:g} s"
                )
            self._say(f"lease {self.id}: waiting for context {self.context_id} to start")
            # Bounded by the heartbeat interval: the wait must not outlast the TTL.
            wait_s = min(WATCH_S, left, self.info.heartbeat_interval_s)
            self.info = await self.client.get_lease(
                self.id, wait_s=wait_s, while_state=LeaseState.PENDING
            )
            # A long wait counts against the TTL: keep the lease alive meanwhile.
            if self.info.state is LeaseState.PENDING:
                self.info = await self.client.heartbeat(self.id)
        self._refuse("wait for its context")
        if self.info.state is not LeaseState.ACTIVE:
            lost = LeaseLost.of(self.info)
            self._mark_lost(lost)
            raise lost
        if self._handle is HandleState.WAITING:
            self._move(HandleState.HELD, "hold it")
        self._say(f"lease {self.id}: context {self.context_id} is running")

    def start_heartbeats(self) -> None:
        """Heartbeat (and watch the lease) from an asyncio task, until it is closed."""
        if self._handle is not HandleState.HELD or self._beating is not None:
            self._refuse("heartbeat")
            raise RuntimeError(
                f"lease {self.id}: cannot start heartbeats: its handle is "
                f"{self._handle.value}" + (" and beating already" if self._beating else "")
            )
        self._beating = asyncio.get_running_loop().create_task(
            self._beat(self.info.heartbeat_interval_s), name=f"pclease-heartbeat-{self.id[:8]}"
        )

    async def _beat(self, interval: float) -> None:
        next_beat = time.monotonic() + interval
        while self._handle is HandleState.HELD:
            wait_s = max(0.0, min(next_beat - time.monotonic(), WATCH_S))
            try:
                current = await self.client.get_lease(
                    self.id, wait_s=wait_s, while_state=LeaseState.ACTIVE
                )
                if current.state is not LeaseState.ACTIVE:
                    self.info = current
                    self._mark_lost(LeaseLost.of(current))
                    return
                if time.monotonic() >= next_beat:
                    self.info = await self.client.heartbeat(self.id)
                    next_beat = time.monotonic() + interval
            except LeaseEnded as exc:
                try:
                    self.info = await self.client.get_lease(self.id)
                    lost = LeaseLost.of(self.info)
                except Exception as lookup:  # ended all the same; say what is known
                    lost = LeaseLost(self.id, None, f"{exc.message} ({lookup})")
                self._mark_lost(lost)
                return
            except Exception as exc:  # the next round retries; the TTL is the limit
                log.warning("heartbeat of lease %s failed: %s", self.id, exc)
                await asyncio.sleep(1.0)

    async def _stop_beating(self) -> None:
        task, self._beating = self._beating, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self, why: str = "released by its holder") -> None:
        """Stop heartbeating and release (idempotent; an attached lease is left alone)."""
        first, ended = self._mark_closed(why)
        await self._stop_beating()
        if first and self.owned and not ended:
            try:
                self.info = await self.client.release(self.id)
            except Exception as exc:  # the service-side TTL ends it anyway
                log.warning("could not release lease %s (its TTL will end it): %s", self.id, exc)

    async def handoff(self) -> LeaseRef:
        """Let another holder take the lease over: stop heartbeating without releasing it.
        The receiver must heartbeat within the lease's TTL."""
        self._mark_closed("handed off to another holder")
        await self._stop_beating()
        return self.ref()

    # -- queries ---------------------------------------------------------------------------

    def remote(
        self,
        lf: pl.LazyFrame,
        *,
        engine: Engine = "auto",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncRemoteQuery:
        """``lease.remote(lf)``, awaited: ``await lease.remote(lf).sink_parquet(uri)``."""
        self.check()
        return AsyncRemoteQuery(
            self, lf, engine=engine, labels={**self.labels, **(labels or {})}, timeout_s=timeout_s
        )

    async def run(
        self, submission: Submission, *, on_progress: QueryProgress | None = None
    ) -> QueryInfo:
        """Submit a prepared plan and follow it until it ends."""
        self.check()
        try:
            query = await self.client.submit(self.id, submission)
        except LeaseEnded:
            self._refuse("run a query")
            self.info = await self.client.get_lease(self.id)
            self._mark_lost(LeaseLost.of(self.info))
            self._refuse("run a query")
            raise
        self._say(f"query {query.id} submitted ({submission.options['target']})")
        return await self.follow(query.id, on_progress=on_progress)

    async def follow(self, query_id: str, *, on_progress: QueryProgress | None = None) -> QueryInfo:
        """Follow a query of this lease until it ends; a query cancelled because the lease
        ended raises :class:`LeaseLost` (or :class:`LeaseClosed`) saying so."""
        try:
            return self._succeeded(
                await self.client.wait_query(
                    query_id, on_progress=on_progress or self._report, check=self.check
                )
            )
        except QueryFailed as exc:
            if exc.state is QueryState.CANCELLED:
                if self._handle is not HandleState.CLOSED and self.lost is None:
                    with contextlib.suppress(Exception):  # the query's own error says enough
                        self.info = await self.client.get_lease(self.id)
                        if self.info.state.is_terminal:
                            self._mark_lost(LeaseLost.of(self.info))
                self._lost_by_cancel(exc, "run a query")
            raise


class AsyncRemoteQuery:
    """One LazyFrame on its way to a lease's context, awaited: say where its result goes."""

    def __init__(
        self,
        lease: AsyncLease,
        lf: pl.LazyFrame,
        *,
        engine: Engine,
        labels: Mapping[str, str],
        timeout_s: float | None,
    ) -> None:
        self._lease = lease
        self._lf = lf
        self._engine: Engine = engine
        self._labels = dict(labels)
        self._timeout_s = timeout_s

    async def _run(
        self,
        target: Target,
        destination: str | None = None,
        storage_options: Mapping[str, str] | None = None,
        sink_options: Mapping[str, Any] | None = None,
    ) -> QueryInfo:
        submission = build_submission(
            self._lf,
            target,
            destination,
            storage_options=storage_options,
            engine=self._engine,
            labels=self._labels,
            timeout_s=self._timeout_s,
            sink_options=sink_options,
        )
        try:
            return await self._lease.run(submission)
        except QueryFailed as exc:
            error = exc.as_polars_error() if self._lease.polars_errors else exc
            if error is exc:
                raise
            raise error from exc

    async def sink_parquet(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return await self._run("parquet", destination, storage_options, sink_options)

    async def sink_csv(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return await self._run("csv", destination, storage_options, sink_options)

    async def sink_ipc(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return await self._run("ipc", destination, storage_options, sink_options)

    async def sink_ndjson(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return await self._run("ndjson", destination, storage_options, sink_options)

    async def collect(self) -> pl.DataFrame:
        query = await self._run("collect")
        return await self._lease.client.result_frame(query.id)
