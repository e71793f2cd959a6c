"""A held lease: heartbeats in the background, watches for its end, runs queries.

``lease.remote(lf)`` mirrors Polars Cloud's ``lf.remote(ctx)``: choose a sink
(``sink_parquet``, ``sink_csv``, ``sink_ipc``, ``sink_ndjson``) or ``collect``, after
``.distributed(...)`` or ``.single_node()`` if the profile's default does not suit. Only
the plan travels; the query runs on the leased context.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from pclease_client.errors import LeaseClosed, LeaseEnded, LeaseLost, QueryFailed
from pclease_client.models import LeaseInfo, QueryInfo
from pclease_client.plans import (
    Engine,
    ShuffleCompression,
    ShuffleFormat,
    SingleWorkerOps,
    Submission,
    Target,
    build_submission,
)
from pclease_client.states import LeaseState, QueryState

if TYPE_CHECKING:
    import polars as pl

    from pclease_client.watchdog import Watchdog

log = logging.getLogger("pclease_client")

#: The longest one long poll on the lease waits for news (the service allows 60 s).
_WATCH_S = 20.0
QueryProgress = Callable[[QueryInfo], None]


class LeaseApi(Protocol):
    """What a :class:`Lease` needs of its client (:class:`~pclease_client.PcleaseClient`)."""

    def get_lease(
        self, lease_id: str, *, wait_s: float = 0, while_state: LeaseState | None = None
    ) -> LeaseInfo: ...

    def heartbeat(self, lease_id: str) -> LeaseInfo: ...

    def release(self, lease_id: str) -> LeaseInfo: ...

    def release_once(self, lease_id: str, *, timeout_s: float = 3.0) -> LeaseInfo: ...

    def watchdog_for(self, lease_id: str, *, give_up_after_s: float) -> Watchdog | None: ...

    def submit(self, lease_id: str, submission: Submission) -> QueryInfo: ...

    def wait_query(
        self,
        query_id: str,
        *,
        timeout_s: float | None = None,
        on_progress: QueryProgress | None = None,
        check: Callable[[], None] | None = None,
    ) -> QueryInfo: ...

    def result_frame(self, query_id: str) -> pl.DataFrame: ...


class HandleState(Enum):
    """Where a :class:`Lease` handle is in its life (the lease's own state on the service is
    :attr:`Lease.state`)::

        waiting ──▶ held ──▶ closed
           │         │         ▲
           └──▶ lost ◀┘─────────┘

    ``waiting``: leased, its context may still be starting; ``held``: its context runs
    (heartbeated, if this handle owns it); ``lost``: it ended underneath its holder
    (:attr:`Lease.lost` says how); ``closed``: this process let it go (and released it, if
    it owned it). Using a closed handle raises :class:`~pclease_client.errors.LeaseClosed`;
    any other move the table below does not allow raises ``RuntimeError`` naming it.
    """

    WAITING = "waiting"
    HELD = "held"
    LOST = "lost"
    CLOSED = "closed"


HANDLE_TRANSITIONS: dict[HandleState, frozenset[HandleState]] = {
    HandleState.WAITING: frozenset({HandleState.HELD, HandleState.LOST, HandleState.CLOSED}),
    HandleState.HELD: frozenset({HandleState.LOST, HandleState.CLOSED}),
    HandleState.LOST: frozenset({HandleState.CLOSED}),
    HandleState.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class LeaseRef:
    """A held lease on its way from one holder to another (an Airflow task to its trigger
    and back): the lease and how its queries are labelled, never a token. The receiver
    brings its own client, with its own credentials, and :meth:`PcleaseClient.resume`
    (or the asynchronous client's) takes the lease over.

    ``to_json``/``from_json`` give a plain JSON object (what Airflow stores for a deferred
    task).
    """

    lease_id: str
    labels: Mapping[str, str] = field(default_factory=dict)
    polars_errors: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "lease_id": self.lease_id,
            "labels": dict(self.labels),
            "polars_errors": self.polars_errors,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LeaseRef:
        lease_id = data.get("lease_id")
        labels = data.get("labels") or {}
        if not isinstance(lease_id, str) or not lease_id:
            raise ValueError("a lease reference needs its lease_id")
        if not isinstance(labels, Mapping):
            raise ValueError("a lease reference's labels are a JSON object")
        return cls(
            lease_id,
            {str(k): str(v) for k, v in labels.items()},
            bool(data.get("polars_errors")),
        )


class LeaseHandle:
    """What every handle on a lease shares, synchronous (:class:`Lease`) or asynchronous
    (:class:`~pclease_client.aio.AsyncLease`): the lease as last read, the handle's life
    (:class:`HandleState`) and what a closed or lost handle raises. No I/O."""

    def __init__(
        self,
        info: LeaseInfo,
        *,
        owned: bool = True,
        labels: Mapping[str, str] | None = None,
        polars_errors: bool = False,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        #: The lease as last read from the service.
        self.info = info
        self.owned = owned
        #: Labels every query on this lease carries (a query's own labels win).
        self.labels = dict(labels or {})
        #: Raise Polars' own exception for a failed query instead of :class:`QueryFailed`.
        self.polars_errors = polars_errors
        self._say = on_progress or (lambda message: log.info("%s", message))
        # Reentrant: release_now runs in a signal handler, on a thread that may hold it.
        self._moving = threading.RLock()
        self._handle = HandleState.WAITING
        self._closed_by = ""
        #: Set once the lease ended underneath its holder.
        self.lost: LeaseLost | None = None
        #: Every query that succeeded through this handle, in order (their lineage too).
        self.queries: list[QueryInfo] = []
        #: Called with each query that succeeds through this handle (lineage reporting).
        self.on_query: Callable[[QueryInfo], None] | None = None
        if info.state is LeaseState.ACTIVE:
            self._handle = HandleState.HELD
        elif info.state.is_terminal:
            self._mark_lost(LeaseLost.of(info))

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def context_id(self) -> str:
        return self.info.context_id

    @property
    def profile(self) -> str:
        return self.info.profile

    @property
    def state(self) -> LeaseState:
        """The lease's state as last read from the service."""
        return self.info.state

    @property
    def handle_state(self) -> HandleState:
        return self._handle

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(id={self.id!r}, profile={self.profile!r}, "
            f"state={self.state.value!r}, handle={self._handle.value!r})"
        )

    def ref(self) -> LeaseRef:
        """This lease as a :class:`LeaseRef`, for another holder to take over."""
        return LeaseRef(self.id, dict(self.labels), self.polars_errors)

    def _move(self, target: HandleState, doing: str) -> None:
        """Move the handle to ``target`` for ``doing``, or say precisely why it cannot."""
        with self._moving:
            if target in HANDLE_TRANSITIONS[self._handle]:
                self._handle = target
                return
            self._refuse(doing)
            raise RuntimeError(
                f"lease {self.id}: cannot {doing}: its handle is {self._handle.value} "
                f"(it may go to {', '.join(s.value for s in HANDLE_TRANSITIONS[self._handle])})"
            )

    def _refuse(self, doing: str) -> None:
        """Raise what a closed or lost handle raises for ``doing``."""
        if self._handle is HandleState.CLOSED:
            raise LeaseClosed(self.id, doing, self._closed_by)
        if self._handle is HandleState.LOST and self.lost is not None:
            raise self.lost

    def _mark_lost(self, lost: LeaseLost) -> bool:
        """The lease ended underneath its holder; False if the handle knew or let go."""
        with self._moving:
            if self._handle in (HandleState.CLOSED, HandleState.LOST):
                return False
            self._handle = HandleState.LOST
            self.lost = lost
        log.error("%s", lost)
        return True

    def _mark_closed(self, why: str) -> tuple[bool, bool]:
        """Close the handle for ``why``: (whether this closed it, whether it was lost)."""
        with self._moving:
            first = self._handle is not HandleState.CLOSED
            ended = self._handle is HandleState.LOST
            if first:
                self._move(HandleState.CLOSED, "close it")
                self._closed_by = why
        return first, ended

    def check(self) -> None:
        """Raise :class:`LeaseLost` if the lease ended underneath its holder, and
        :class:`LeaseClosed` if this process let it go."""
        self._refuse("run more work on it")

    def _lost_by_cancel(self, exc: QueryFailed, doing: str) -> None:
        """A query of this lease was cancelled: raise why, if the lease's end is why."""
        if self._handle is HandleState.CLOSED:
            raise LeaseClosed(self.id, doing, self._closed_by) from exc
        if self.lost is not None:
            raise self.lost from exc

    def _succeeded(self, query: QueryInfo) -> QueryInfo:
        self.queries.append(query)
        if self.on_query is not None:
            self.on_query(query)
        return query

    def _report(self, query: QueryInfo) -> None:
        extra = ""
        if query.state is QueryState.SUCCEEDED:
            extra = f": {query.rows} rows in {query.duration_s} s"
        self._say(f"query {query.id} {query.state.value}{extra}")


class Lease(LeaseHandle):
    """A lease this process uses: made by :meth:`PcleaseClient.lease` (owned: heartbeated
    and released by this handle) or :meth:`PcleaseClient.attach` (someone else's).

    The heartbeat thread also watches the lease (a long poll on its state), so a lease that
    ends underneath its holder (revoked, expired, released by someone else) is noticed at
    once: :attr:`lost` is set, and a query waiting on it fails with :class:`LeaseLost`
    as soon as the service has cancelled it. :attr:`handle_state` is this handle's life
    (:class:`HandleState`).
    """

    def __init__(
        self,
        client: LeaseApi,
        info: LeaseInfo,
        *,
        owned: bool = True,
        labels: Mapping[str, str] | None = None,
        polars_errors: bool = False,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: Watchdog | None = None
        super().__init__(
            info,
            owned=owned,
            labels=labels,
            polars_errors=polars_errors,
            on_progress=on_progress,
        )

    # -- holding it ------------------------------------------------------------------------

    def guard_with_watchdog(self) -> None:
        """Release this lease the moment this process dies (see
        :mod:`pclease_client.watchdog`); after its TTL the service ends it anyway."""
        if self.owned and self._watchdog is None and self._handle is not HandleState.CLOSED:
            self._watchdog = self.client.watchdog_for(self.id, give_up_after_s=self.info.ttl_s)

    def wait_active(self, timeout_s: float) -> None:
        """Wait until the lease's context runs (heartbeating meanwhile); raise
        :class:`LeaseLost` if it ends instead or ``timeout_s`` passes (the lease is
        released then)."""
        deadline = time.monotonic() + timeout_s
        while self._handle is HandleState.WAITING and self.info.state is LeaseState.PENDING:
            if time.monotonic() > deadline:
                self.close(f"its context was not running after {timeout_s:g} s")
                raise LeaseLost(
                    self.id, LeaseState.PENDING, f"context not running after {timeout_s:g} s"
                )
            self._say(f"lease {self.id}: waiting for context {self.context_id} to start")
            self.info = self.client.get_lease(
                self.id, wait_s=_WATCH_S, while_state=LeaseState.PENDING
            )
            # A long wait counts against the TTL: keep the lease alive meanwhile.
            if self.info.state is LeaseState.PENDING:
                self.info = self.client.heartbeat(self.id)
        self._refuse("wait for its context")
        if self.info.state is not LeaseState.ACTIVE:
            lost = LeaseLost.of(self.info)
            self._lose(lost)
            raise lost
        if self._handle is HandleState.WAITING:
            self._move(HandleState.HELD, "hold it")
        self._say(f"lease {self.id}: context {self.context_id} is running")

    def start_heartbeats(self) -> None:
        """Heartbeat (and watch the lease) from a background thread, until it is closed."""
        if self._handle is not HandleState.HELD or self._thread is not None:
            self._refuse("heartbeat")
            raise RuntimeError(
                f"lease {self.id}: cannot start heartbeats: its handle is "
                f"{self._handle.value}" + (" and beating already" if self._thread else "")
            )
        self._thread = threading.Thread(
            target=self._beat,
            args=(self.info.heartbeat_interval_s,),
            name=f"pclease-heartbeat-{self.id[:8]}",
            daemon=True,
        )
        self._thread.start()

    def _beat(self, interval: float) -> None:
        """Heartbeat every ``interval``; between beats, long-poll the lease's state so that
        its end is seen at once rather than at the next beat."""
        next_beat = time.monotonic() + interval
        while not self._stop.is_set():
            wait_s = max(0.0, min(next_beat - time.monotonic(), _WATCH_S))
            try:
                current = self.client.get_lease(
                    self.id, wait_s=wait_s, while_state=LeaseState.ACTIVE
                )
                if self._stop.is_set():
                    return
                if current.state is not LeaseState.ACTIVE:
                    self.info = current
                    self._lose(LeaseLost.of(current))
                    return
                if time.monotonic() >= next_beat:
                    self.info = self.client.heartbeat(self.id)
                    next_beat = time.monotonic() + interval
            except LeaseEnded as exc:
                if self._stop.is_set():
                    return
                try:
                    lost = self._lost()
                except Exception as lookup:  # ended all the same; say what is known
                    lost = LeaseLost(self.id, None, f"{exc.message} ({lookup})")
                self._lose(lost)
                return
            except Exception as exc:  # the next round retries; the TTL is the limit
                if self._stop.is_set():
                    return
                log.warning("heartbeat of lease %s failed: %s", self.id, exc)
                self._stop.wait(1.0)

    def _lose(self, lost: LeaseLost) -> None:
        if not self._mark_lost(lost):
            return  # let go already, or known lost
        self._stop.set()
        # The holder cannot release it any more; nor need the watchdog.
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None

    def _lost(self) -> LeaseLost:
        self.info = self.client.get_lease(self.id)
        return LeaseLost.of(self.info)

    def close(self, why: str = "released by its holder") -> None:
        """Stop heartbeating and release (idempotent; an attached lease is left alone).

        The heartbeat thread is not waited for: it may be in a long poll, and it stops
        without another request once that returns."""
        first, ended = self._mark_closed(why)
        self._stop.set()
        if first and self.owned and not ended and not self._release():
            # Leave the watchdog armed: it releases the lease when this process exits.
            return
        if self._watchdog is not None:  # disarmed by release_now maybe, but not reaped
            self._watchdog.disarm()
            self._watchdog = None

    def _release(self) -> bool:
        """Release through the client; once more on a connection of its own if that fails
        (an interrupted request can leave the pooled one unusable). False if neither did."""
        try:
            self.info = self.client.release(self.id)
            return True
        except Exception as exc:
            first_error = exc
        try:
            self.info = self.client.release_once(self.id)
            return True
        except Exception as exc:
            after = "when this process exits" if self._watchdog is not None else "after its TTL"
            log.warning(
                "could not release lease %s (%s; then %s): it ends %s",
                self.id,
                first_error,
                exc,
                after,
            )
            return False

    def release_now(self, *, timeout_s: float = 3.0) -> None:
        """Release at once from a signal handler: stop heartbeating, then one short request
        on a connection of its own (see :meth:`PcleaseClient.release_once`). A later
        :meth:`close` reaps the watchdog."""
        with self._moving:
            if self._handle is HandleState.CLOSED:
                return
            ended = self._handle is HandleState.LOST
            self._move(HandleState.CLOSED, "release it")
            self._closed_by = "its task was killed"
        self._stop.set()
        if self.owned and not ended:
            try:
                self.client.release_once(self.id, timeout_s=timeout_s)
            except Exception as exc:  # the watchdog or the service-side TTL ends it anyway
                log.warning("could not release lease %s (its TTL will end it): %s", self.id, exc)
                return
        if self._watchdog is not None:
            self._watchdog.disarm(wait=False)

    def handoff(self) -> LeaseRef:
        """Let another holder take the lease over (:meth:`PcleaseClient.resume`, or the
        asynchronous client's): stop heartbeating and watching it and disarm the watchdog,
        without releasing it. The receiver must heartbeat within the lease's TTL."""
        self._mark_closed("handed off to another holder")
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.disarm()
            self._watchdog = None
        return self.ref()

    # -- queries ---------------------------------------------------------------------------

    def remote(
        self,
        lf: pl.LazyFrame,
        *,
        engine: Engine = "auto",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> RemoteQuery:
        """Mirror of Polars Cloud's ``lf.remote(ctx)``: choose a sink or collect."""
        self.check()
        return RemoteQuery(
            self, lf, engine=engine, labels={**self.labels, **(labels or {})}, timeout_s=timeout_s
        )

    def run(self, submission: Submission, *, on_progress: QueryProgress | None = None) -> QueryInfo:
        """Submit a prepared plan and follow it until it ends."""
        self.check()
        try:
            query = self.client.submit(self.id, submission)
        except LeaseEnded:  # it ended before the heartbeat thread noticed
            self._refuse("run a query")
            self._lose(self._lost())
            self._refuse("run a query")
            raise
        self._say(f"query {query.id} submitted ({submission.options['target']})")
        try:
            return self._succeeded(
                self.client.wait_query(
                    query.id, on_progress=on_progress or self._report, check=self.check
                )
            )
        except QueryFailed as exc:
            # The service cancels the queries of a lease that ends: say why it ended.
            if exc.state is QueryState.CANCELLED:
                if self._handle is not HandleState.CLOSED and self.lost is None:
                    lost = self._lost_if_ended()
                    if lost is not None:
                        self._lose(lost)
                self._lost_by_cancel(exc, "run a query")
            raise

    def _lost_if_ended(self) -> LeaseLost | None:
        try:
            lost = self._lost()
        except Exception:  # the query's own error says enough then
            return None
        return lost if lost.state is not None and lost.state.is_terminal else None


class RemoteQuery:
    """One LazyFrame on its way to a lease's context: say where its result goes, and
    optionally how it runs (``.distributed(...)`` or ``.single_node()``, as on Polars
    Cloud; without either the lease's profile decides)."""

    def __init__(
        self,
        lease: Lease,
        lf: pl.LazyFrame,
        *,
        engine: Engine,
        labels: Mapping[str, str],
        timeout_s: float | None,
        distributed: bool | Mapping[str, Any] | None = None,
    ) -> None:
        self._lease = lease
        self._lf = lf
        self._engine: Engine = engine
        self._labels = dict(labels)
        self._timeout_s = timeout_s
        self._distributed = distributed

    def _with(self, distributed: bool | Mapping[str, Any]) -> RemoteQuery:
        return RemoteQuery(
            self._lease,
            self._lf,
            engine=self._engine,
            labels=self._labels,
            timeout_s=self._timeout_s,
            distributed=distributed,
        )

    def distributed(
        self,
        *,
        shuffle_compression: ShuffleCompression | None = None,
        shuffle_format: ShuffleFormat | None = None,
        shuffle_compression_level: int | None = None,
        equi_join_broadcast_limit: int | None = None,
        partitions_per_worker: int | None = None,
        single_worker_ops: SingleWorkerOps | None = None,
        expression_lowering: bool | None = None,
        min_workers: int | None = None,
        max_workers: int | None = None,
    ) -> RemoteQuery:
        """Run on Polars Cloud's distributed engine, like ``lf.remote(ctx).distributed()``
        (same keywords). What is left out comes from the profile's defaults, then from
        Polars Cloud's. The service answers 422 (``InvalidInput``) when the lease's backend
        or profile cannot run distributed queries (the local backend; cluster_size 1)."""
        if self._engine == "in-memory":
            raise ValueError("engine 'in-memory' not supported for distributed queries")
        given = {
            "shuffle_compression": shuffle_compression,
            "shuffle_format": shuffle_format,
            "shuffle_compression_level": shuffle_compression_level,
            "equi_join_broadcast_limit": equi_join_broadcast_limit,
            "partitions_per_worker": partitions_per_worker,
            "single_worker_ops": single_worker_ops,
            "expression_lowering": expression_lowering,
            "min_workers": min_workers,
            "max_workers": max_workers,
        }
        settings = {key: value for key, value in given.items() if value is not None}
        return self._with(settings or True)

    def single_node(self) -> RemoteQuery:
        """Run on one node, even on a profile whose queries run distributed by default."""
        return self._with(False)

    def _run(
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
            distributed=self._distributed,
        )
        try:
            return self._lease.run(submission)
        except QueryFailed as exc:
            error = exc.as_polars_error() if self._lease.polars_errors else exc
            if error is exc:
                raise
            raise error from exc

    def sink_parquet(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return self._run("parquet", destination, storage_options, sink_options)

    def sink_csv(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return self._run("csv", destination, storage_options, sink_options)

    def sink_ipc(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return self._run("ipc", destination, storage_options, sink_options)

    def sink_ndjson(
        self,
        destination: str,
        *,
        storage_options: Mapping[str, str] | None = None,
        **sink_options: Any,
    ) -> QueryInfo:
        return self._run("ndjson", destination, storage_options, sink_options)

    def collect(self) -> pl.DataFrame:
        query = self._run("collect")
        return self._lease.client.result_frame(query.id)
