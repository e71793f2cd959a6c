"""What clients can do with queries: submit, read (long-poll), list, cancel, fetch results."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import anyio.to_thread

from pclease_service.blobs import BlobNotFound, Readable
from pclease_service.clock import Clock
from pclease_service.config import Settings
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    LeaseEnded,
    LeaseNotFound,
    NotFound,
    QueryNotFound,
)
from pclease_service.notify import Notifier, long_poll
from pclease_service.plans.access import lineage
from pclease_service.plans.check import Reader, check_plan
from pclease_service.plans.targets import QueryTarget
from pclease_service.principals import Principal
from pclease_service.queries.distribution import Requested, resolve
from pclease_service.queries.spool import Spool
from pclease_service.states import QueryState
from pclease_service.store import leases, queries
from pclease_service.store.queries import QueryRecord


@dataclass(frozen=True)
class QueryRequest:
    """A validated submission (the API builds it from the options JSON)."""

    target: QueryTarget
    destination: str | None
    engine: str
    labels: Mapping[str, str]
    polars_version: str
    timeout_s: float | None
    #: None: the profile decides; see :func:`pclease_service.queries.distribution.resolve`.
    distributed: Requested = None


class QueryManager:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        notifier: Notifier,
        clock: Clock,
        spool: Spool,
        *,
        reader: Callable[[], Reader],
        denied_paths: tuple[str, ...] = (),
        backend: str = "memory",
        backend_distributes: bool = False,
    ) -> None:
        self.settings = settings
        self.db = db
        self.notifier = notifier
        self.clock = clock
        self.spool = spool
        #: The Polars the service's contexts run (what the version rule checks against).
        self.reader = reader
        self.denied_paths = denied_paths
        #: The backend's kind and whether it runs distributed queries (its capabilities).
        self.backend = backend
        self.backend_distributes = backend_distributes

    async def submit(
        self, principal: Principal, lease_id: str, data: bytes, request: QueryRequest
    ) -> QueryRecord:
        if not principal.can_lease:
            raise Forbidden("running queries needs a token with the lease scope")
        lease = await self.db.read(lambda tx: leases.get_lease(tx, lease_id))
        if lease is None or (lease.token_id != principal.token_id and not principal.is_admin):
            raise LeaseNotFound(lease_id)
        if lease.state.is_terminal:
            raise LeaseEnded(lease_id, lease.state.value, lease.end_reason)
        profile = self.settings.profiles.get(lease.profile)
        distributed = resolve(
            request.distributed,
            profile,
            backend=self.backend,
            backend_distributes=self.backend_distributes,
            engine=request.engine,
        )
        # The whole pipeline, once, in a thread: decoding a plan of up to max_plan_bytes is
        # pure Python and takes time. A plan refused now is refused with a 422 before it is
        # queued; the backend checks again where the plan runs.
        info = await anyio.to_thread.run_sync(
            lambda: check_plan(
                data,
                reader=self.reader(),
                target=request.target,
                allow_python_udfs=profile.allow_python_udfs if profile else False,
                data_roots=tuple(profile.data_roots) if profile else (),
                denied_paths=self.denied_paths,
                client_polars_version=request.polars_version,
            )
        )
        # The destination a query shows is where its plan writes, not a free label.
        written = info.output.path if info.output is not None else None
        if request.destination is not None and written not in (None, request.destination):
            raise InvalidInput(
                f"options.destination is {request.destination!r}, but the plan writes "
                f"to {written!r}; send the sink's own path as destination"
            )
        timeout = request.timeout_s or self.settings.query_timeout_s
        if timeout > self.settings.query_timeout_max_s:
            raise InvalidInput(
                f"timeout_s may be at most {self.settings.query_timeout_max_s:g} seconds"
            )
        inputs, outputs = lineage(info)
        query_id = str(uuid.uuid4())
        await anyio.to_thread.run_sync(self.spool.write_plan, query_id, data)

        def unit(tx: Tx) -> QueryRecord:
            current = leases.get_lease(tx, lease_id)
            assert current is not None
            if current.state.is_terminal:
                raise LeaseEnded(lease_id, current.state.value, current.end_reason)
            return queries.insert_query(
                tx,
                query_id=query_id,
                lease_id=current.id,
                context_id=current.context_id,
                token_id=current.token_id,
                target=request.target.value,
                destination=request.destination,
                engine=request.engine,
                labels=request.labels,
                client_polars_version=request.polars_version,
                plan_bytes=len(data),
                timeout_s=timeout,
                actor=principal.actor,
                distributed=distributed.model_dump() if distributed is not None else None,
                inputs=inputs,
                outputs=outputs,
            )

        try:
            query = await self.db.write(unit)
        except BaseException:
            await anyio.to_thread.run_sync(self.spool.discard_plan, query_id)
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

        async def read() -> QueryRecord:
            found = await self.db.read(lambda tx: queries.get_query(tx, query_id))
            return self._visible(principal, found, query_id)

        return await long_poll(
            self.clock,
            wait_s,
            token=lambda: self.notifier.query_token(query_id),
            read=read,
            done=lambda query: query.state.is_terminal,
            ended=lambda: self.notifier.draining,
        )

    async def list_for_lease(self, principal: Principal, lease_id: str) -> list[QueryRecord]:
        lease = await self.db.read(lambda tx: leases.get_lease(tx, lease_id))
        if lease is None or (not principal.can_read_all and lease.token_id != principal.token_id):
            raise LeaseNotFound(lease_id)
        return await self.db.read(lambda tx: queries.list_queries(tx, lease_id=lease_id))

    async def cancel(self, principal: Principal, query_id: str) -> QueryRecord:
        def unit(tx: Tx) -> QueryRecord:
            query = self._visible(principal, queries.get_query(tx, query_id), query_id)
            if not principal.is_admin and query.token_id != principal.token_id:
                raise Forbidden("only the query's owner or an admin token may cancel it")
            if not query.state.is_terminal:
                queries.request_query_cancel(
                    tx,
                    query_id,
                    actor=principal.actor,
                    reason=f"cancelled by {principal.actor}",
                )
            updated = queries.get_query(tx, query_id)
            assert updated is not None
            return updated

        return await self.db.write(unit)

    async def result(self, principal: Principal, query_id: str) -> Readable | bytes:
        """A collect query's stored result: as a stream (read as it is sent), or its bytes
        when it is small (read in the same thread that opened it, not chunk by chunk)."""
        query = self._visible(
            principal, await self.db.read(lambda tx: queries.get_query(tx, query_id)), query_id
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

        def open_result() -> Readable | bytes:
            readable = self.spool.open_result(query_id)
            small = readable.small()
            return readable if small is None else small

        try:
            return await anyio.to_thread.run_sync(open_result)
        except BlobNotFound:
            raise NotFound(
                f"the result of query {query_id} has been deleted (results are kept "
                f"{self.settings.result_ttl_s:g} s after their lease ends); run it again"
            ) from None
