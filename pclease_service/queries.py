"""Queries run through a lease: submission, the runner that executes them, results.

A client submits plan bytes on its lease (:class:`QueryManager`). The service checks the
bytes without deserializing them (``service.plans``), spools them to disk, and records a
``queued`` query. The :class:`QueryRunner` (like the reconciler, a loop that alone calls
the backend for its resource) starts queued queries whose lease is active, awaits the
backend's ``execute`` and records the outcome. Cancelling a query, or ending its lease in
any way, flags it; the runner cancels the task that runs it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import anyio.to_thread

from pclease_service import metrics, plans, store
from pclease_service.backends import plan_guard
from pclease_service.backends.base import (
    Backend,
    BackendError,
    QueryOutcome,
    QuerySpec,
    QueryTarget,
)
from pclease_service.clock import Clock
from pclease_service.config import Profile, Settings
from pclease_service.db.session import Database
from pclease_service.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LeaseEnded,
    LeaseNotFound,
    NotFound,
    PlanRefused,
    QueryNotFound,
)
from pclease_service.leases import Principal
from pclease_service.loops import tick_forever
from pclease_service.notify import Notifier, wait_token
from pclease_service.states import LIVE_QUERY_STATES, ContextState, LeaseState, QueryState
from pclease_service.store import QueryRecord, Tx

log = logging.getLogger("pclease.queries")

ACTOR = "query-runner"
_RECHECK_S = 1.0
_HOUSEKEEPING_S = 60.0


@dataclass(frozen=True)
class QueryRequest:
    """A validated submission (the API builds it from the options JSON)."""

    target: QueryTarget
    destination: str | None
    engine: str
    labels: Mapping[str, str]
    polars_version: str
    timeout_s: float | None


class Spool:
    """Plans waiting to run and collect results, as files under the data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.plans = self.root / "plans"
        self.results = self.root / "results"

    def prepare(self) -> None:
        for directory in (self.root, self.plans, self.results):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def plan_path(self, query_id: str) -> Path:
        return self.plans / f"{query_id}.plan"

    def result_path(self, query_id: str) -> Path:
        return self.results / f"{query_id}.arrow"

    def write_plan(self, query_id: str, data: bytes) -> None:
        path = self.plan_path(query_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    def read_plan(self, query_id: str) -> bytes:
        return self.plan_path(query_id).read_bytes()

    def discard_plan(self, query_id: str) -> None:
        self.plan_path(query_id).unlink(missing_ok=True)


class QueryManager:
    """What clients can do with queries."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        notifier: Notifier,
        spool: Spool,
        *,
        context_polars_version: str,
        context_signature: Callable[[], plans.PlanSignature],
        denied_paths: tuple[str, ...] = (),
    ) -> None:
        self.denied_paths = denied_paths
        self.settings = settings
        self.db = db
        self.notifier = notifier
        self.spool = spool
        self.context_polars_version = context_polars_version
        self.context_signature = context_signature

    def _check_plan(self, data: bytes, request: QueryRequest, allow_udfs: bool) -> None:
        """The cheap checks, on the event loop: header, version, completeness, UDF marker."""
        try:
            signature = plans.read_signature(data)
            if signature != self.context_signature():
                raise plans.PlanRejected(
                    "plan_version_mismatch",
                    f"the plan was made by Polars {request.polars_version} but this "
                    f"service's contexts run Polars {self.context_polars_version}; install "
                    f"polars=={self.context_polars_version} where the plan is built",
                )
            plans.check_complete(data)
        except plans.PlanRejected as exc:
            raise PlanRefused(exc.code, str(exc)) from None
        if plans.contains_python_udf(data) and not allow_udfs:
            raise PlanRefused(
                "python_udf_refused",
                "the plan contains a Python function (map_elements, map_batches, a UDF); "
                "running it would unpickle code, so this profile refuses it. Express it "
                "with Polars expressions, or ask an operator to set allow_python_udfs = "
                "true on the profile",
            )

    def _guard(self, data: bytes, target: QueryTarget, profile: Profile | None) -> None:
        """Walk the whole plan (in a thread: it is pure Python and takes time on big plans)
        for pickled Python without the marker and for paths outside the data roots, so a
        plan that would be refused anyway is refused now, with a 422, before it is queued.
        The backend checks again where the plan runs."""
        allow = profile.allow_python_udfs if profile else False
        roots = tuple(profile.data_roots) if profile else ()
        try:
            info = plan_guard.inspect(data, allow_python_udfs=allow)
            plan_guard.check_access(info, target, roots, self.denied_paths)
        except plan_guard.PlanError as exc:
            code = {
                "PlanInvalid": "plan_invalid",
                "PlanVersionMismatch": "plan_version_mismatch",
            }.get(exc.type, "plan_refused")
            raise PlanRefused(code, exc.message) from None

    async def submit(
        self, principal: Principal, lease_id: str, data: bytes, request: QueryRequest
    ) -> QueryRecord:
        if not principal.can_lease:
            raise Forbidden("running queries needs a token with the lease scope")
        lease = await self.db.read(lambda tx: store.get_lease(tx, lease_id))
        if lease is None or (lease.token_id != principal.token_id and not principal.is_admin):
            raise LeaseNotFound(lease_id)
        if lease.state.is_terminal:
            raise LeaseEnded(lease_id, lease.state.value, lease.end_reason)
        profile = self.settings.profiles.get(lease.profile)
        self._check_plan(data, request, profile.allow_python_udfs if profile else False)
        await anyio.to_thread.run_sync(self._guard, data, request.target, profile)
        timeout = request.timeout_s or self.settings.query_timeout_s
        if timeout > self.settings.query_timeout_max_s:
            raise InvalidInput(
                f"timeout_s may be at most {self.settings.query_timeout_max_s:g} seconds"
            )
        query_id = str(uuid.uuid4())
        await anyio.to_thread.run_sync(self.spool.write_plan, query_id, data)

        def unit(tx: Tx) -> QueryRecord:
            current = store.get_lease(tx, lease_id)
            assert current is not None
            if current.state.is_terminal:
                raise LeaseEnded(lease_id, current.state.value, current.end_reason)
            return store.insert_query(
                tx,
                query_id=query_id,
                lease=current,
                target=request.target.value,
                destination=request.destination,
                engine=request.engine,
                labels=request.labels,
                client_polars_version=request.polars_version,
                plan_bytes=len(data),
                timeout_s=timeout,
                actor=principal.actor,
            )

        try:
            query = await self.db.write(unit)
        except BaseException:
            self.spool.discard_plan(query_id)
            raise
        return query

    def _visible(
        self, principal: Principal, query: QueryRecord | None, query_id: str
    ) -> QueryRecord:
        if query is None or (not principal.can_read_all and query.token_id != principal.token_id):
            raise QueryNotFound(query_id)
        return query

    async def get(self, principal: Principal, query_id: str, *, wait_s: float = 0.0) -> QueryRecord:
        """The query; with ``wait_s``, wait until it has finished (or the time is up)."""
        if not 0 <= wait_s <= self.settings.long_poll_max_s:
            raise InvalidInput(
                f"wait_s must be between 0 and {self.settings.long_poll_max_s:g} seconds"
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            token = self.notifier.query_token(query_id)
            query = self._visible(
                principal,
                await self.db.read(lambda tx: store.get_query(tx, query_id)),
                query_id,
            )
            remaining = deadline - loop.time()
            if query.state.is_terminal or remaining <= 0:
                return query
            await wait_token(token, min(remaining, _RECHECK_S))

    async def list_for_lease(self, principal: Principal, lease_id: str) -> list[QueryRecord]:
        lease = await self.db.read(lambda tx: store.get_lease(tx, lease_id))
        if lease is None or (not principal.can_read_all and lease.token_id != principal.token_id):
            raise LeaseNotFound(lease_id)
        return await self.db.read(lambda tx: store.list_queries(tx, lease_id=lease_id))

    async def cancel(self, principal: Principal, query_id: str) -> QueryRecord:
        def unit(tx: Tx) -> QueryRecord:
            query = self._visible(principal, store.get_query(tx, query_id), query_id)
            if not principal.is_admin and query.token_id != principal.token_id:
                raise Forbidden("only the query's owner or an admin token may cancel it")
            if not query.state.is_terminal:
                store.request_query_cancel(
                    tx,
                    query_id,
                    actor=principal.actor,
                    reason=f"cancelled by {principal.actor}",
                )
            updated = store.get_query(tx, query_id)
            assert updated is not None
            return updated

        return await self.db.write(unit)

    async def result_file(self, principal: Principal, query_id: str) -> Path:
        query = self._visible(
            principal, await self.db.read(lambda tx: store.get_query(tx, query_id)), query_id
        )
        if query.target != QueryTarget.COLLECT.value:
            raise Conflict(
                f"query {query_id} is a {query.target} sink; its output is at "
                f"{query.output or query.destination}, there is no result to download"
            )
        if query.state is not QueryState.SUCCEEDED:
            raise Conflict(
                f"query {query_id} is {query.state.value}; wait for it with "
                f"GET /v1/queries/{query_id}?wait_s=30 before fetching its result"
            )
        path = self.spool.result_path(query_id)
        if not path.exists():
            raise NotFound(
                f"the result of query {query_id} has been deleted (results are kept "
                f"{self.settings.result_ttl_s:g} s after their lease ends); run it again"
            )
        return path


class QueryRunner:
    """Starts queued queries on running contexts and records how they end."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        backend: Backend,
        notifier: Notifier,
        spool: Spool,
        clock: Clock,
        *,
        denied_paths: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.db = db
        self.backend = backend
        self.notifier = notifier
        self.spool = spool
        self.clock = clock
        self.denied_paths = denied_paths
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._housekept_at: float | None = None

    async def recover(self) -> None:
        """Queries left ``running`` by a previous service process cannot be followed."""

        def unit(tx: Tx) -> int:
            orphans = store.list_queries(tx, states=[QueryState.RUNNING], limit=100_000)
            for query in orphans:
                store.transition_query(
                    tx,
                    query.id,
                    QueryState.FAILED,
                    actor=ACTOR,
                    reason="the service restarted while the query ran",
                    values={
                        "finished_at": tx.now,
                        "error_type": "ServiceRestarted",
                        "error_message": "the service restarted while the query ran; "
                        "submit it again",
                    },
                )
            return len(orphans)

        if count := await self.db.write(unit):
            log.warning("failed %d query(ies) left running by a previous process", count)

    async def run(self) -> None:
        """Tick forever; a failing tick is logged with its traceback and the loop goes on."""
        await tick_forever(
            self.tick,
            wake=self.notifier.runner,
            interval_s=self.settings.reconcile_interval_s,
            log=log,
        )

    async def tick(self) -> None:
        def snapshot(tx: Tx) -> tuple[list[QueryRecord], dict[str, tuple[str, str, object]]]:
            live = store.list_queries(tx, states=LIVE_QUERY_STATES, limit=10_000)
            where: dict[str, tuple[str, str, object]] = {}
            for query in live:
                lease = store.get_lease(tx, query.lease_id)
                context = store.get_context(tx, query.context_id)
                if lease is not None and context is not None:
                    where[query.id] = (
                        lease.state.value,
                        context.state.value,
                        context.backend_handle,
                    )
            return live, where

        live, where = await self.db.read(snapshot)
        for query in reversed(live):  # oldest first
            task = self._tasks.get(query.id)
            if query.state is QueryState.RUNNING:
                if query.cancel_requested and task is not None and not task.done():
                    task.cancel()
                continue
            lease_state, context_state, handle = where.get(query.id, ("", "", None))
            if lease_state != LeaseState.ACTIVE.value:
                continue  # its context is still starting; ended leases cancel their queries
            if context_state != ContextState.RUNNING.value or not isinstance(handle, Mapping):
                continue
            started = await self.db.write(self._start_unit(query.id))
            if started is not None:
                self._tasks[started.id] = asyncio.create_task(
                    self._execute(started, handle), name=f"query-{started.id}"
                )
        self._tasks = {qid: t for qid, t in self._tasks.items() if not t.done()}
        now = asyncio.get_running_loop().time()
        if self._housekept_at is None or now - self._housekept_at >= _HOUSEKEEPING_S:
            self._housekept_at = now
            await self.housekeeping()

    @staticmethod
    def _start_unit(query_id: str) -> Callable[[Tx], QueryRecord | None]:
        def unit(tx: Tx) -> QueryRecord | None:
            return store.transition_query(
                tx,
                query_id,
                QueryState.RUNNING,
                actor=ACTOR,
                reason="sent to its context",
                sources=[QueryState.QUEUED],
                values={"started_at": tx.now},
            )

        return unit

    async def drain(self) -> None:
        while pending := [t for t in self._tasks.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await self.drain()

    def _spec(
        self, query: QueryRecord, plan: bytes, profile_roots: tuple[str, ...], allow_udfs: bool
    ) -> QuerySpec:
        return QuerySpec(
            query_id=query.id,
            plan=plan,
            target=QueryTarget(query.target),
            result_path=str(self.spool.result_path(query.id))
            if query.target == QueryTarget.COLLECT.value
            else None,
            engine=query.engine,
            timeout_s=query.timeout_s,
            max_result_bytes=self.settings.max_result_bytes,
            allow_python_udfs=allow_udfs,
            data_roots=profile_roots,
            denied_paths=self.denied_paths,
            labels=dict(query.labels),
        )

    async def _execute(self, query: QueryRecord, handle: Mapping[str, object]) -> None:
        lease = await self.db.read(lambda tx: store.get_lease(tx, query.lease_id))
        profile = self.settings.profiles.get(lease.profile) if lease else None
        roots = tuple(profile.data_roots) if profile else ()
        allow_udfs = profile.allow_python_udfs if profile else False
        try:
            plan = await anyio.to_thread.run_sync(self.spool.read_plan, query.id)
            spec = self._spec(query, plan, roots, allow_udfs)
            del plan
            outcome = await asyncio.wait_for(
                self.backend.execute(handle, spec), query.timeout_s + 60
            )
        except asyncio.CancelledError:
            await self._finish_cancelled(query)
            return
        except TimeoutError:
            outcome = QueryOutcome(
                ok=False,
                error_type="QueryTimeout",
                error_message=f"the query ran longer than its timeout of {query.timeout_s:g} s",
            )
        except BackendError as exc:
            outcome = QueryOutcome(ok=False, error_type="BackendError", error_message=str(exc))
        except FileNotFoundError:
            outcome = QueryOutcome(
                ok=False,
                error_type="PlanLost",
                error_message="the spooled plan is gone (was the data directory cleaned?); "
                "submit the query again",
            )
        finally:
            self.spool.discard_plan(query.id)
        await self._finish(query, outcome)

    async def _finish(self, query: QueryRecord, outcome: QueryOutcome) -> None:
        def unit(tx: Tx) -> None:
            values: dict[str, object] = {
                "finished_at": tx.now,
                "rows": outcome.rows,
                "result_bytes": outcome.result_bytes,
                "output": outcome.output
                if query.target != QueryTarget.COLLECT.value
                else (f"/v1/queries/{query.id}/result" if outcome.ok else None),
                "error_type": outcome.error_type,
                "error_message": outcome.error_message,
            }
            if outcome.ok:
                store.transition_query(
                    tx,
                    query.id,
                    QueryState.SUCCEEDED,
                    actor=ACTOR,
                    reason=f"finished: {outcome.rows} rows",
                    values=values,
                )
            else:
                store.transition_query(
                    tx,
                    query.id,
                    QueryState.FAILED,
                    actor=ACTOR,
                    reason=f"{outcome.error_type}: {outcome.error_message}"[:500],
                    values=values,
                )
            store.extend_lease(tx, query.lease_id)

        await self.db.write(unit)
        if query.started_at is not None:
            metrics.query_finished(
                "succeeded" if outcome.ok else "failed",
                (self.clock.now() - query.started_at).total_seconds(),
            )
        if not outcome.ok and query.target == QueryTarget.COLLECT.value:
            self.spool.result_path(query.id).unlink(missing_ok=True)

    async def _finish_cancelled(self, query: QueryRecord) -> None:
        self.spool.result_path(query.id).unlink(missing_ok=True)

        def unit(tx: Tx) -> None:
            current = store.get_query(tx, query.id)
            reason = (current.error_message if current else None) or "cancelled"
            store.transition_query(
                tx,
                query.id,
                QueryState.CANCELLED,
                actor=ACTOR,
                reason=reason,
                values={"finished_at": tx.now, "error_type": "Cancelled", "error_message": reason},
            )

        await self.db.write(unit)
        if query.started_at is not None:
            elapsed = (self.clock.now() - query.started_at).total_seconds()
            metrics.query_finished("cancelled", elapsed)

    async def housekeeping(self) -> None:
        """Delete spooled plans of finished queries and results whose lease ended long ago."""
        cutoff = self.clock.now() - timedelta(seconds=self.settings.result_ttl_s)

        def stale(tx: Tx) -> tuple[list[str], list[str]]:
            plan_ids = [p.stem for p in self.spool.plans.glob("*.plan")]
            result_ids = [p.stem for p in self.spool.results.glob("*.arrow")]
            dead_plans = []
            for qid in plan_ids:
                query = store.get_query(tx, qid)
                if query is not None and query.state.is_terminal:
                    dead_plans.append(qid)
            dead_results = []
            for qid in result_ids:
                query = store.get_query(tx, qid)
                lease = store.get_lease(tx, query.lease_id) if query else None
                if lease is None or (lease.ended_at is not None and lease.ended_at < cutoff):
                    dead_results.append(qid)
            return dead_plans, dead_results

        dead_plans, dead_results = await self.db.read(stale)
        for qid in dead_plans:
            self.spool.discard_plan(qid)
        for qid in dead_results:
            self.spool.result_path(qid).unlink(missing_ok=True)
