"""The query runner: like the reconciler, a loop that alone calls the backend for its
resource. It starts queued queries whose lease is active on a running context, awaits the
backend's ``execute`` and records the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import anyio.to_thread

from pclease_service.backends.base import Backend, QueryOutcome, QuerySpec
from pclease_service.blobs import BlobNotFound
from pclease_service.clock import Clock, within
from pclease_service.config import DistributedSettings, Settings
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import BackendError, PayloadTooLarge, StorageUnavailable
from pclease_service.instruments import Instruments, NoInstruments
from pclease_service.loops import tick_forever
from pclease_service.notify import Notifier
from pclease_service.plans.targets import QueryTarget
from pclease_service.queries.spool import Spool
from pclease_service.states import ContextState, LeaseState, QueryState
from pclease_service.store import leases, queries, replicas
from pclease_service.store.queries import QueryRecord

log = logging.getLogger("pclease.queries")

ACTOR = "query-runner"
_HOUSEKEEPING_S = 60.0
# On top of a query's own timeout (which the backend enforces): shipping the plan and
# reading the result back.
_EXECUTE_MARGIN_S = 60.0


@dataclass(frozen=True)
class _Where:
    """Where a live query would run: its lease's and its context's state."""

    lease: LeaseState
    context: ContextState
    handle: Mapping[str, object] | None
    profile: str

    @property
    def ready(self) -> bool:
        # A lease still pending waits for its context; ended leases cancel their queries.
        return (
            self.lease is LeaseState.ACTIVE
            and self.context is ContextState.RUNNING
            and self.handle is not None
        )


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
        instruments: Instruments | None = None,
        replica: str = "pclease",
    ) -> None:
        self.settings = settings
        self.replica = replica
        #: While set, no query is started here (the replica is draining).
        self.draining = False
        self._orphans_checked_at: float | None = None
        self.db = db
        self.backend = backend
        self.notifier = notifier
        self.spool = spool
        self.clock = clock
        self.denied_paths = denied_paths
        self.instruments = instruments or NoInstruments()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._housekept_at: float | None = None
        #: Whether the last tick left a queued query waiting, and whether one runs now
        #: (see _slot_freed).
        self._backlog = False
        self._ticking = False

    async def recover(self, *, at_start: bool = False) -> None:
        """Queries left ``running`` by a replica that is gone (it exited, or stopped
        heartbeating for ``replica_ttl_s``) cannot be followed: they fail. Those of live
        replicas are left alone, and so are this one's, except ``at_start``: then they
        are an earlier process's under the same replica id."""
        ttl_s = self.settings.replica_ttl_s

        def unit(tx: Tx) -> int:
            alive = replicas.alive_ids(tx, ttl_s)
            if at_start:
                alive.discard(self.replica)
            else:
                alive.add(self.replica)
            orphans = queries.orphaned_queries(tx, alive=alive)
            for query in orphans:
                queries.transition_query(
                    tx,
                    query.id,
                    QueryState.FAILED,
                    actor=ACTOR,
                    reason=f"replica {query.runner_replica or '(unknown)'}, which ran it, is gone",
                    sources=[QueryState.RUNNING],
                    values={
                        "finished_at": tx.now,
                        "error_type": "ServiceRestarted",
                        "error_message": "the service replica running the query stopped "
                        "while it ran; submit it again",
                    },
                )
            return len(orphans)

        if count := await self.db.write(unit):
            log.warning("failed %d query(ies) left running by a replica that is gone", count)

    async def run(self) -> None:
        """Tick forever; a failing tick is logged with its traceback and the loop goes on."""
        await tick_forever(
            self.tick,
            wake=self.notifier.runner,
            interval_s=self.settings.reconcile_interval_s,
            clock=self.clock,
            log=log,
        )

    async def tick(self) -> None:
        self._ticking = True
        try:
            await self._tick()
        finally:
            self._ticking = False

    async def _tick(self) -> None:
        def snapshot(tx: Tx) -> tuple[list[QueryRecord], dict[str, _Where]]:
            placed = queries.live_placed(tx)
            where = {
                p.query.id: _Where(
                    LeaseState(p.lease_state), ContextState(p.context_state), p.handle, p.profile
                )
                for p in placed
            }
            return [p.query for p in placed], where

        now = self.clock.monotonic()
        if (
            self._orphans_checked_at is None
            or now - self._orphans_checked_at >= self.settings.replica_heartbeat_s
        ):
            self._orphans_checked_at = now
            await self.recover()
        live, where = await self.db.read(snapshot)
        # Each context runs its profile's concurrent_queries at once; the rest wait in
        # submission order (start_query holds the limit in SQL as well).
        busy: dict[str, int] = {}
        for query in live:
            if query.state is QueryState.RUNNING:
                busy[query.context_id] = busy.get(query.context_id, 0) + 1
        queued = started_here = 0
        for query in reversed(live):  # oldest first
            task = self._tasks.get(query.id)
            if query.state is QueryState.RUNNING:
                if query.cancel_requested and task is not None and not task.done():
                    task.cancel()
                continue
            queued += 1
            if self.draining:
                continue
            place = where.get(query.id)
            if place is None or not place.ready or place.handle is None:
                continue
            if not self.backend.reaches(place.handle):
                continue  # a worker on another replica's machine: that replica runs it
            limit = self._slots(place.profile)
            if busy.get(query.context_id, 0) >= limit:
                continue
            started = await self.db.write(self._start_unit(query.id, limit))
            if started is not None:
                started_here += 1
                busy[query.context_id] = busy.get(query.context_id, 0) + 1
                self._tasks[started.id] = asyncio.create_task(
                    self._execute(started, place.handle, place.profile), name=f"query-{started.id}"
                )
        self._backlog = queued > started_here
        self._tasks = {qid: t for qid, t in self._tasks.items() if not t.done()}
        now = self.clock.monotonic()
        if self._housekept_at is None or now - self._housekept_at >= _HOUSEKEEPING_S:
            self._housekept_at = now
            await self.housekeeping()

    def _slot_freed(self) -> None:
        # The runner's own writes do not wake it (Tx.by_runner): a query that ended frees
        # a slot, which matters only if the last tick left queued queries waiting, or if
        # a tick is under way (it may be leaving some waiting on the slot freed now).
        if self._backlog or self._ticking:
            self.notifier.runner.set()

    def _slots(self, profile_name: str) -> int:
        profile = self.settings.profiles.get(profile_name)
        return profile.concurrent_queries if profile is not None else 1

    def _start_unit(self, query_id: str, limit: int) -> Callable[[Tx], QueryRecord | None]:
        replica = self.replica

        def unit(tx: Tx) -> QueryRecord | None:
            tx.by_runner = True
            return queries.start_query(tx, query_id, limit=limit, actor=ACTOR, replica=replica)

        return unit

    async def drain(self) -> None:
        while pending := [t for t in self._tasks.values() if not t.done()]:
            await asyncio.gather(*pending, return_exceptions=True)

    async def shutdown(self, *, grace_s: float = 0.0) -> None:
        """Start nothing more; give the queries this replica runs ``grace_s`` to finish,
        then cancel what is left (they end ``cancelled``, with the reason)."""
        self.draining = True
        pending = [t for t in self._tasks.values() if not t.done()]
        if pending and grace_s > 0:
            log.info("waiting up to %g s for %d running query(ies)", grace_s, len(pending))
            with contextlib.suppress(TimeoutError):
                await within(self.clock, grace_s, asyncio.gather(*pending, return_exceptions=True))
        for task in self._tasks.values():
            task.cancel()
        await self.drain()

    def _spec(
        self, query: QueryRecord, plan: bytes, profile_roots: tuple[str, ...], allow_udfs: bool
    ) -> QuerySpec:
        collect = query.target == QueryTarget.COLLECT.value
        return QuerySpec(
            query_id=query.id,
            plan=plan,
            target=QueryTarget(query.target),
            result_path=str(self.spool.result_path(query.id)) if collect else None,
            engine=query.engine,
            timeout_s=query.timeout_s,
            max_result_bytes=self.settings.max_result_bytes,
            allow_python_udfs=allow_udfs,
            data_roots=profile_roots,
            denied_paths=self.denied_paths,
            labels=dict(query.labels),
            distributed=DistributedSettings.model_validate(query.distributed)
            if query.distributed is not None
            else None,
        )

    async def _execute(
        self, query: QueryRecord, handle: Mapping[str, object], profile_name: str
    ) -> None:
        profile = self.settings.profiles.get(profile_name)
        roots = tuple(profile.data_roots) if profile else ()
        allow_udfs = profile.allow_python_udfs if profile else False
        try:
            plan = await anyio.to_thread.run_sync(self.spool.read_plan, query.id)
            spec = self._spec(query, plan, roots, allow_udfs)
            del plan
            outcome = await within(
                self.clock,
                query.timeout_s + _EXECUTE_MARGIN_S,
                self.backend.execute(handle, spec),
            )
        except asyncio.CancelledError:
            await self._forget_plan(query.id)
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
        except BlobNotFound:
            outcome = QueryOutcome(
                ok=False,
                error_type="PlanLost",
                error_message="the stored plan is gone (was the storage of plans and results "
                "cleaned, or is it not shared by every replica?); submit the query again",
            )
        except StorageUnavailable as exc:
            outcome = QueryOutcome(
                ok=False, error_type="StorageUnavailable", error_message=exc.message
            )
        if outcome.ok and query.target == QueryTarget.COLLECT.value:
            try:
                await anyio.to_thread.run_sync(self.spool.keep_result, query.id)
            except PayloadTooLarge as exc:
                outcome = QueryOutcome(
                    ok=False, error_type="ResultTooLarge", error_message=exc.message
                )
            except StorageUnavailable as exc:
                outcome = QueryOutcome(
                    ok=False, error_type="StorageUnavailable", error_message=exc.message
                )
            except FileNotFoundError:
                outcome = QueryOutcome(
                    ok=False,
                    error_type="ResultLost",
                    error_message="the backend reported a result but wrote no result file",
                )
        try:
            await self._finish(query, outcome)
        finally:
            # After the finish, which is what the client waits for.
            await self._forget_plan(query.id)

    async def _forget_plan(self, query_id: str) -> None:
        # On failure the spool has logged it; housekeeping deletes it later.
        with contextlib.suppress(StorageUnavailable):
            await anyio.to_thread.run_sync(self.spool.discard_plan, query_id)

    async def _forget_result(self, query_id: str) -> None:
        # On failure the spool has logged it; housekeeping deletes it later.
        with contextlib.suppress(StorageUnavailable):
            await anyio.to_thread.run_sync(self.spool.discard_result, query_id)

    def _ran_for(self, query: QueryRecord) -> float:
        assert query.started_at is not None
        return (self.clock.now() - query.started_at).total_seconds()

    async def _finish(self, query: QueryRecord, outcome: QueryOutcome) -> None:
        collect = query.target == QueryTarget.COLLECT.value

        def unit(tx: Tx) -> None:
            tx.by_runner = True
            values: dict[str, object] = {
                "finished_at": tx.now,
                "rows": outcome.rows,
                "result_bytes": outcome.result_bytes,
                "output": outcome.output
                if not collect
                else (f"/v1/queries/{query.id}/result" if outcome.ok else None),
                "error_type": outcome.error_type,
                "error_message": outcome.error_message,
            }
            if outcome.ok:
                queries.transition_query(
                    tx,
                    query.id,
                    QueryState.SUCCEEDED,
                    actor=ACTOR,
                    reason=f"finished: {outcome.rows} rows",
                    values=values,
                )
            else:
                queries.transition_query(
                    tx,
                    query.id,
                    QueryState.FAILED,
                    actor=ACTOR,
                    reason=f"{outcome.error_type}: {outcome.error_message}"[:500],
                    values=values,
                )
            leases.extend_lease(tx, query.lease_id)

        await self.db.write(unit)
        self._slot_freed()
        if query.started_at is not None:
            outcome_name = QueryState.SUCCEEDED if outcome.ok else QueryState.FAILED
            self.instruments.query_finished(outcome_name.value, self._ran_for(query))
        if not outcome.ok and collect:
            await self._forget_result(query.id)

    async def _finish_cancelled(self, query: QueryRecord) -> None:
        await self._forget_result(query.id)

        def unit(tx: Tx) -> None:
            tx.by_runner = True
            current = queries.get_query(tx, query.id)
            reason = (current.error_message if current else None) or "cancelled"
            queries.transition_query(
                tx,
                query.id,
                QueryState.CANCELLED,
                actor=ACTOR,
                reason=reason,
                values={"finished_at": tx.now, "error_type": "Cancelled", "error_message": reason},
            )

        await self.db.write(unit)
        self._slot_freed()
        if query.started_at is not None:
            self.instruments.query_finished(QueryState.CANCELLED.value, self._ran_for(query))

    async def housekeeping(self) -> None:
        """Delete spooled plans of finished queries and results whose lease ended long ago."""
        cutoff = self.clock.now() - timedelta(seconds=self.settings.result_ttl_s)

        try:
            plan_ids = await anyio.to_thread.run_sync(self.spool.plan_ids)
            result_ids = await anyio.to_thread.run_sync(self.spool.result_ids)
        except StorageUnavailable:
            return  # logged by the spool; next time

        def stale(tx: Tx) -> tuple[list[str], list[str]]:
            dead_plans = []
            for qid in plan_ids:
                query = queries.get_query(tx, qid)
                if query is not None and query.state.is_terminal:
                    dead_plans.append(qid)
            dead_results = []
            for qid in result_ids:
                query = queries.get_query(tx, qid)
                lease = leases.get_lease(tx, query.lease_id) if query else None
                if lease is None or (lease.ended_at is not None and lease.ended_at < cutoff):
                    dead_results.append(qid)
            return dead_plans, dead_results

        dead_plans, dead_results = await self.db.read(stale)
        for qid in dead_plans:
            await self._forget_plan(qid)
        for qid in dead_results:
            await self._forget_result(qid)
