"""Queries on Polars Cloud: forwarded in proxy mode, followed, cancelled, results fetched.

The plan bytes go through the client's proxy-mode submit exactly as the client sent them,
after the plan pipeline has run once more here (:func:`pclease_service.plans.check.
check_plan`, against the Polars that Polars Cloud contexts run: this service's pinned one).
Once submitted, a query is cancelled on Polars Cloud whenever :meth:`CloudQueries.execute`
ends without its outcome (task cancelled, timeout, Polars Cloud unreachable while waiting);
a submission that timed out is cancelled as soon as its answer arrives. ``collect`` results
(the ``<in-memory>`` sink) are read from the location Polars Cloud reports and written as
Arrow IPC to ``QuerySpec.result_path``; a local result larger on disk than
``max_result_bytes`` is refused before it is read (other locations are checked after
conversion).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from pclease_service.backends.base import LABEL_QUERY_ID, Handle, QueryOutcome, QuerySpec
from pclease_service.backends.polars_cloud.calls import CallTimeout, CloudCalls
from pclease_service.backends.polars_cloud.client import (
    QUERY_DONE,
    CloudError,
    QueryOutput,
    QueryStatus,
    parse_query_errors,
)
from pclease_service.backends.polars_cloud.ledger import handle_of
from pclease_service.errors import BackendError, PlanRefused
from pclease_service.plans.check import Reader, check_plan
from pclease_service.plans.header import local_header, local_polars_version
from pclease_service.plans.targets import QueryTarget

log = logging.getLogger("pclease.backends.polars_cloud")


class CloudQueries:
    def __init__(self, calls: CloudCalls) -> None:
        self.calls = calls

    async def execute(self, handle: Handle, query: QuerySpec) -> QueryOutcome:
        """Forward the plan to the context and wait for its outcome (see the module
        docstring). Raises BackendError only if Polars Cloud cannot be reached."""
        workspace_id, compute_id = handle_of(handle)
        refused = await asyncio.to_thread(self._check_plan, query)
        if refused is not None:
            return refused
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.timeout_s
        query_id = await self._submit_query(workspace_id, compute_id, query)
        log.info("query %s runs on Polars Cloud as %s", query.query_id, query_id)
        try:
            status = await self._wait(workspace_id, query_id, deadline)
        except BaseException:
            # Cancelled, or Polars Cloud stopped answering: the query must not run on.
            self.calls.cancel_soon(workspace_id, query_id)
            raise
        if status is None:
            self.calls.cancel_soon(workspace_id, query_id)
            return QueryOutcome(
                ok=False,
                error_type="QueryTimeout",
                error_message=f"the query ran longer than its timeout of {query.timeout_s:g} s",
            )
        if status.status == "Canceled":
            return QueryOutcome(
                ok=False,
                error_type="QueryCancelled",
                error_message="Polars Cloud cancelled the query (was its context stopped?)",
            )
        if status.status == "Failed":
            errors = status.errors
            if not errors:
                with contextlib.suppress(CloudError, CallTimeout, BackendError):
                    errors = (await self.calls.once("query_output", query_id)).errors
            error_type, message = parse_query_errors(errors)
            return QueryOutcome(ok=False, error_type=error_type, error_message=message)
        try:
            output = await self.calls.safe("query result", "query_output", query_id)
        except CloudError as exc:
            raise BackendError(f"the query's result is gone: {exc.message}") from None
        if query.target is not QueryTarget.COLLECT:
            where = ", ".join(output.locations) or None
            return QueryOutcome(ok=True, rows=output.rows, output=where)
        return await asyncio.to_thread(self._fetch_result, query, output)

    async def _submit_query(self, workspace_id: str, compute_id: str, query: QuerySpec) -> str:
        """The query's Polars Cloud id. A submission that is abandoned (timeout, task
        cancelled) may still land: the query is then cancelled as soon as it is known."""
        timeout_s = self.calls.timeout_s
        labels = [f"{LABEL_QUERY_ID}={query.query_id}"]
        labels += [f"{key}={value}" for key, value in sorted(query.labels.items())]
        distributed = query.distributed.model_dump() if query.distributed is not None else None
        future = self.calls.submit(
            "submit", compute_id, query.plan, query.engine, labels, distributed
        )
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
        except CloudError as exc:
            raise BackendError(f"Polars Cloud refused the query: {exc.message}") from None
        except BaseException as exc:
            if future.cancel():  # it never began: nothing was sent
                if isinstance(exc, TimeoutError):
                    raise BackendError(
                        f"the query could not be sent to Polars Cloud within {timeout_s:g} s "
                        "(too many calls under way); retry it"
                    ) from None
                raise
            future.add_done_callback(
                lambda done: self._cancel_late_submission(workspace_id, query.query_id, done)
            )
            if isinstance(exc, TimeoutError):
                raise BackendError(
                    f"Polars Cloud did not answer the query's submission within "
                    f"{timeout_s:g} s; if it took the query after all, the query is cancelled "
                    "as soon as its answer arrives. Retry the query"
                ) from None
            raise

    def _cancel_late_submission(
        self, workspace_id: str, query_id: str, done: concurrent.futures.Future[str]
    ) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        log.warning(
            "query %s reached Polars Cloud (as %s) after it was abandoned; cancelling it",
            query_id,
            done.result(),
        )
        self.calls.cancel_soon(workspace_id, done.result())

    def _check_plan(self, query: QuerySpec) -> QueryOutcome | None:
        """The plan pipeline once more, where the plan leaves for Polars Cloud (whose
        contexts run this service's pinned Polars)."""
        try:
            check_plan(
                query.plan,
                reader=Reader(local_header(), local_polars_version()),
                target=query.target,
                allow_python_udfs=query.allow_python_udfs,
                data_roots=query.data_roots,
                denied_paths=query.denied_paths,
            )
        except PlanRefused as exc:
            return QueryOutcome(ok=False, error_type=exc.error_type, error_message=exc.message)
        return None

    async def _wait(self, workspace_id: str, query_id: str, deadline: float) -> QueryStatus | None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            try:
                status: QueryStatus = await self.calls.safe(
                    "query status", "query_status", workspace_id, query_id
                )
            except CloudError as exc:
                raise BackendError(f"Polars Cloud lost the query: {exc.message}") from None
            if status.status in QUERY_DONE:
                return status
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(1.0, delay * 1.5)

    def _result_size(self, locations: tuple[str, ...]) -> int | None:
        """The result's size on disk when every location is a local file, else None."""
        total = 0
        for location in locations:
            path = location.removeprefix("file://")
            if "://" in path:
                return None
            try:
                total += os.stat(path).st_size
            except OSError:
                return None
        return total

    def _too_large(self, size: int, query: QuerySpec) -> QueryOutcome:
        return QueryOutcome(
            ok=False,
            error_type="ResultTooLarge",
            error_message=f"the result is {size} bytes, more than the "
            f"{query.max_result_bytes} a collect may return; sink it to storage instead",
        )

    def _fetch_result(self, query: QuerySpec, output: QueryOutput) -> QueryOutcome:
        import polars as pl

        assert query.result_path is not None
        if not output.locations:
            return QueryOutcome(
                ok=False,
                error_type="ResultLost",
                error_message="Polars Cloud reported no location for the query's result",
            )
        scan: Mapping[str | None, Callable[..., pl.LazyFrame]] = {
            "parquet": pl.scan_parquet,
            "ipc": pl.scan_ipc,
            "csv": pl.scan_csv,
            "ndjson": pl.scan_ndjson,
        }
        reader = scan.get(output.file_type or "parquet")
        if reader is None:
            return QueryOutcome(
                ok=False,
                error_type="ResultUnreadable",
                error_message=f"cannot read a {output.file_type} result",
            )
        stored = self._result_size(output.locations)
        if stored is not None and stored > query.max_result_bytes:
            return self._too_large(stored, query)  # refused before reading any of it
        path = Path(query.result_path)
        tmp = path.with_name(path.name + ".part")
        try:
            reader(list(output.locations)).sink_ipc(tmp)
            size = tmp.stat().st_size
            if size > query.max_result_bytes:
                tmp.unlink(missing_ok=True)
                return self._too_large(size, query)
            os.replace(tmp, path)
        except Exception as exc:
            tmp.unlink(missing_ok=True)
            return QueryOutcome(
                ok=False,
                error_type="ResultUnreadable",
                error_message=f"could not read the result from Polars Cloud: "
                f"{type(exc).__name__}: {str(exc)[:300]}",
            )
        rows = output.rows
        if rows is None:
            rows = int(pl.scan_ipc(path).select(pl.len()).collect().item())
        return QueryOutcome(ok=True, rows=rows, result_bytes=size)
