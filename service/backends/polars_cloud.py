"""A backend whose contexts are Polars Cloud compute contexts (proxy mode).

Talks to Polars Cloud through the pinned ``polars-cloud`` client; every call into its
undocumented layer is in ``_polars_cloud_client`` (read its docstring for why and for the
client behaviour this relies on). Blocking client calls run in threads, each bounded by
``polars_cloud.request_timeout_s``.

**Auth.** The service, not the client, holds the service account: a
:class:`~service.credentials.TokenProvider` does the OAuth2 exchange and the backend puts
only the short-lived access token in ``POLARS_CLOUD_ACCESS_TOKEN``, which the client reads
on every call. Before each call the backend asks the provider for a token (refreshed
before it expires); when Polars Cloud answers 401 it invalidates that token (the provider
re-reads the source, so a rotated secret takes effect) and retries the call once. The
client secret never reaches the environment.

**Handles** are ``{"workspace_id": str, "compute_id": str}``.

**Which contexts are ours.** Contexts are started with the deployment's labels
(``pclease.managed-by=pclease``, ``pclease.instance``, ``pclease.context-id``,
``pclease.profile`` as ``key=value`` strings) so they can be told apart in Polars Cloud's
own UI, but polars-cloud 0.12.0's compute model does not return labels, so :meth:`list`
cannot read them back. Instead the backend keeps a ledger under
``data_dir/polars_cloud/ledger/`` (one small JSON file per context, no secrets): an entry
is written *before* the start request (compute id still unknown) and completed when the
start returns. :meth:`list` reports

- live computes whose id is in the ledger, with their context id;
- a live compute that the service account started and no entry knows, if a pending
  entry of the same workspace asked for it (a start whose answer was lost or timed out);
  the entry is completed, so the reconciler adopts or stops it;
- with ``polars_cloud.stop_unknown_computes`` on, any other live compute the service
  account started, without a context id, so the reconciler stops it. That setting is for
  a service account this deployment has to itself: computes the account starts elsewhere
  would count as orphans. Off (the default), they are left alone and Polars Cloud's own
  ``idle_timeout_mins`` is the backstop for a lost ledger.

**Failures.** Status, list and stop are retried on errors (they are safe to repeat). A
start is retried only after listing shows that the failed attempt did not create a
compute; a start that timed out is not retried (its request may still land), and its
pending ledger entry lets the next sweep find what it created.

**Queries** go through the client's proxy-mode submit with the plan bytes exactly as the
client sent them, after the same plan checks the local backend makes. ``collect``
results (the ``<in-memory>`` sink) are read from the location Polars Cloud reports and
written as Arrow IPC to ``QuerySpec.result_path``.

Exceptions::

    BackendError    a call failed after its retries, the credentials do not work, or a
                    handle is unusable (a query that fails is an outcome, not an exception)
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.backends import _polars_cloud_client as cloud
from service.backends import plan_guard
from service.backends.base import (
    Backend,
    BackendError,
    ContextSpec,
    Handle,
    Observation,
    Observed,
    Phase,
    QueryOutcome,
    QuerySpec,
    QueryTarget,
)
from service.config import Settings
from service.credentials import CredentialsError, CredentialStatus, TokenProvider

log = logging.getLogger("pclease.backends.polars_cloud")

T = TypeVar("T")

_PHASES = {
    "Starting": Phase.STARTING,
    "Idle": Phase.RUNNING,
    "Running": Phase.RUNNING,
    "Stopping": Phase.STOPPING,
    "Stopped": Phase.STOPPED,
    "Failed": Phase.FAILED,
}
_RETRY_DELAYS_S = (0.3, 1.0)
_START_ATTEMPTS = 3
# A compute's request_time may precede our clock's idea of when we asked by this much.
_CLOCK_SKEW_S = 120.0
# Pending ledger entries nobody claimed are dropped after this long.
_PENDING_TTL_S = 3600.0


class _Timeout(Exception):
    pass


@dataclass(frozen=True)
class _Entry:
    context_id: str
    workspace_id: str
    compute_id: str | None
    requested_at: float
    cpus: int | None
    memory_gb: float | None
    cluster_size: int

    def handle(self) -> dict[str, Any]:
        return {"workspace_id": self.workspace_id, "compute_id": self.compute_id}


class _Ledger:
    """What this deployment started, one JSON file per context (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def _path(self, context_id: str) -> Path:
        if not context_id or "/" in context_id or context_id.startswith("."):
            raise BackendError(f"context id {context_id!r} cannot name a ledger entry")
        return self.directory / f"{context_id}.json"

    def write(self, entry: _Entry) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(entry.context_id)
        tmp = path.with_name(path.name + ".tmp")
        with self._lock:
            tmp.write_text(json.dumps(entry.__dict__))
            tmp.replace(path)

    def forget(self, context_id: str) -> None:
        with self._lock:
            self._path(context_id).unlink(missing_ok=True)

    def entries(self) -> builtins.list[_Entry]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(_Entry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("ignoring unreadable ledger entry %s", path.name)
        return found


def _handle_of(handle: Handle) -> tuple[str, str]:
    try:
        return str(handle["workspace_id"]), str(handle["compute_id"])
    except (KeyError, TypeError) as exc:
        raise BackendError(f"not a polars_cloud backend handle: {dict(handle)!r}") from exc


class PolarsCloudBackend(Backend):
    """Polars Cloud compute contexts; see the module docstring."""

    kind = "polars_cloud"
    stop_on_shutdown = False

    def __init__(
        self,
        settings: Settings,
        provider: TokenProvider,
        *,
        state_dir: Path | None = None,
        client: cloud.CloudClient | None = None,
    ) -> None:
        self.settings = settings
        self.options = settings.polars_cloud
        self.provider = provider
        self.state_dir = (state_dir or settings.data_dir / "polars_cloud").resolve()
        self.ledger = _Ledger(self.state_dir / "ledger")
        cloud.prepare_environment(self.options.api_addr, self.state_dir / "client")
        self._client = client
        self._user_id: str | None = None
        self._cancels: set[threading.Thread] = set()

    # -- plumbing ---------------------------------------------------------------------
    @property
    def client(self) -> cloud.CloudClient:
        if self._client is None:
            self._client = cloud.CloudClient()
        return self._client

    def credential_status(self) -> CredentialStatus:
        return self.provider.status()

    def _credentials_failed(self, exc: CredentialsError) -> BackendError:
        return BackendError(f"Polars Cloud credentials are not usable: {exc.message}")

    def _authorized(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """One client call with a current token; on 401, a fresh token and one retry."""
        for attempt in (0, 1):
            try:
                token = self.provider.token()
            except CredentialsError as exc:
                raise self._credentials_failed(exc) from None
            cloud.use_token(token)
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                error = cloud.translate(exc)
            if error.auth and attempt == 0:
                log.info("Polars Cloud refused the access token; fetching a new one")
                self.provider.invalidate(token)
                continue
            if error.auth:
                raise BackendError(
                    "Polars Cloud refused a fresh access token for the service account from "
                    f"{self.provider.source.describe()} ({error.message}); check that the "
                    "service account may use the workspace"
                )
            raise error
        raise AssertionError("unreachable")

    async def _once(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        timeout_s = self.options.request_timeout_s
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._authorized, fn, *args, **kwargs), timeout_s
            )
        except TimeoutError:
            raise _Timeout(f"Polars Cloud did not answer within {timeout_s:g} s") from None

    async def _safe(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """A call that is safe to repeat: retried on errors other than not-found."""
        last: str = ""
        for attempt in range(len(_RETRY_DELAYS_S) + 1):
            if attempt:
                await asyncio.sleep(_RETRY_DELAYS_S[attempt - 1])
            try:
                return await self._once(fn, *args)
            except cloud.CloudError as exc:
                if exc.not_found:
                    raise
                last = exc.message
            except _Timeout as exc:
                last = str(exc)
            log.warning("Polars Cloud %s failed (attempt %d): %s", what, attempt + 1, last)
        raise BackendError(f"Polars Cloud {what} failed {len(_RETRY_DELAYS_S) + 1} times: {last}")

    async def _our_user(self) -> str:
        if self._user_id is None:
            self._user_id = await self._safe("user lookup", self.client.user_id)
        return self._user_id

    def _workspace_name(self, spec_workspace: str | None) -> str:
        name = spec_workspace or self.options.workspace
        if not name:
            raise BackendError(
                "no Polars Cloud workspace for this profile; set workspace on the profile "
                "or polars_cloud.workspace"
            )
        return name

    async def _workspace_id(self, name: str) -> str:
        try:
            return await self._safe("workspace lookup", self.client.workspace_id, name)
        except cloud.CloudError as exc:
            raise BackendError(exc.message) from None

    # -- Backend: contexts ---------------------------------------------------------------
    async def start(self, spec: ContextSpec) -> Handle:
        workspace_id = await self._workspace_id(self._workspace_name(spec.workspace))
        user_id = await self._our_user()
        entry = _Entry(
            context_id=spec.context_id,
            workspace_id=workspace_id,
            compute_id=None,
            requested_at=time.time(),
            cpus=spec.cpus,
            memory_gb=spec.memory_gb,
            cluster_size=spec.cluster_size,
        )
        await asyncio.to_thread(self.ledger.write, entry)
        options = spec.options
        labels = [f"{key}={value}" for key, value in sorted(spec.labels.items())]
        last = ""
        for attempt in range(_START_ATTEMPTS):
            if attempt:
                await asyncio.sleep(_RETRY_DELAYS_S[min(attempt - 1, len(_RETRY_DELAYS_S) - 1)])
            try:
                compute_id = await self._once(
                    self.client.start,
                    workspace_id,
                    cpus=spec.cpus,
                    memory_gb=spec.memory_gb,
                    instance_type=spec.instance_type,
                    storage_gb=spec.storage_gb,
                    cluster_size=spec.cluster_size,
                    requirements=list(options.get("requirements") or []),
                    env=dict(options.get("env") or {}),
                    labels=labels,
                    idle_timeout_mins=int(options.get("idle_timeout_mins") or 30),
                )
            except _Timeout as exc:
                # The request may still create a compute; the pending entry lets the next
                # sweep find it. Another attempt now could make a second one.
                raise BackendError(
                    f"{exc} to the start request; not retrying, so that no second context "
                    "is started (a context it created is found and stopped by the next sweep)"
                ) from None
            except cloud.CloudError as exc:
                last = exc.message
                log.warning(
                    "starting context %s failed (attempt %d): %s",
                    spec.context_id,
                    attempt + 1,
                    last,
                )
                try:
                    found = await self._find_started(entry, user_id)
                except BackendError as list_exc:
                    raise BackendError(
                        f"start failed ({last}) and listing the workspace to see whether it "
                        f"created a context failed too ({list_exc}); not retrying"
                    ) from None
                if found is not None:
                    log.info("the failed start of %s did create compute %s", spec.context_id, found)
                    return {"workspace_id": workspace_id, "compute_id": found}
                continue
            done = _Entry(**{**entry.__dict__, "compute_id": compute_id})
            await asyncio.to_thread(self.ledger.write, done)
            log.info("started Polars Cloud compute %s for context %s", compute_id, spec.context_id)
            return done.handle()
        await asyncio.to_thread(self.ledger.forget, spec.context_id)
        raise BackendError(
            f"Polars Cloud refused to start the context {_START_ATTEMPTS} times: {last}"
        )

    async def _find_started(self, entry: _Entry, user_id: str) -> str | None:
        """The compute a failed start request created after all, if any."""
        computes = await self._safe("list", self.client.list, entry.workspace_id)
        known = {e.compute_id for e in self.ledger.entries() if e.compute_id}
        for compute in computes:
            if compute.id not in known and self._matches(entry, compute, user_id):
                done = _Entry(**{**entry.__dict__, "compute_id": compute.id})
                await asyncio.to_thread(self.ledger.write, done)
                return compute.id
        return None

    @staticmethod
    def _matches(entry: _Entry, compute: cloud.Compute, user_id: str) -> bool:
        return (
            compute.user_id == user_id
            and compute.workspace_id == entry.workspace_id
            and compute.status in cloud.COMPUTE_LIVE
            and compute.request_time >= entry.requested_at - _CLOCK_SKEW_S
            and (entry.cpus is None or compute.cpus in (None, entry.cpus))
            and compute.cluster_size == entry.cluster_size
        )

    async def status(self, handle: Handle) -> Observation:
        workspace_id, compute_id = _handle_of(handle)
        try:
            compute = await self._safe("status", self.client.get, workspace_id, compute_id)
        except cloud.CloudError as exc:  # not found
            return Observation(Phase.STOPPED, f"the Polars Cloud context is gone ({exc.message})")
        phase = _PHASES.get(compute.status)
        if phase is None:
            return Observation(Phase.STARTING, f"unknown Polars Cloud status {compute.status!r}")
        message = None
        if phase is Phase.FAILED:
            message = (
                f"Polars Cloud reports the context failed: {compute.message or 'no reason given'}"
            )
        elif phase is Phase.STOPPED:
            message = f"Polars Cloud stopped the context ({compute.message or 'no reason given'})"
        elif phase is Phase.STARTING:
            message = "Polars Cloud is starting the context"
        return Observation(phase, message)

    async def stop(self, handle: Handle) -> None:
        workspace_id, compute_id = _handle_of(handle)
        try:
            await self._safe("stop", self.client.stop, workspace_id, compute_id)
        except cloud.CloudError:  # not found: nothing left to stop
            pass
        except BackendError:
            # Already ended (stopping a stopped compute may be refused): that is success.
            try:
                compute = await self._once(self.client.get, workspace_id, compute_id)
            except (cloud.CloudError, _Timeout):
                raise BackendError(
                    f"could not stop Polars Cloud compute {compute_id}; retrying later"
                ) from None
            if compute.status in cloud.COMPUTE_LIVE:
                raise
        await asyncio.to_thread(self._forget_compute, compute_id)

    def _forget_compute(self, compute_id: str) -> None:
        for entry in self.ledger.entries():
            if entry.compute_id == compute_id:
                self.ledger.forget(entry.context_id)

    async def list(self) -> builtins.list[Observed]:
        names = {p.workspace for p in self.settings.profiles.values() if p.workspace}
        if self.options.workspace:
            names.add(self.options.workspace)
        workspace_ids = {await self._workspace_id(name) for name in sorted(names)}
        entries = await asyncio.to_thread(self.ledger.entries)
        workspace_ids |= {e.workspace_id for e in entries}
        user_id = await self._our_user()
        by_compute = {e.compute_id: e for e in entries if e.compute_id}
        pending = sorted((e for e in entries if e.compute_id is None), key=lambda e: e.requested_at)
        found: builtins.list[Observed] = []
        seen: set[str] = set()
        for workspace_id in sorted(workspace_ids):
            computes = await self._safe("list", self.client.list, workspace_id)
            for compute in sorted(computes, key=lambda c: c.request_time):
                seen.add(compute.id)
                phase = _PHASES.get(compute.status, Phase.STARTING)
                if compute.status not in cloud.COMPUTE_LIVE:
                    continue
                entry = by_compute.get(compute.id)
                if entry is None and compute.user_id == user_id:
                    entry = next((e for e in pending if self._matches(e, compute, user_id)), None)
                    if entry is not None:
                        pending.remove(entry)
                        entry = _Entry(**{**entry.__dict__, "compute_id": compute.id})
                        await asyncio.to_thread(self.ledger.write, entry)
                if entry is not None:
                    found.append(Observed(entry.handle(), phase, entry.context_id))
                elif compute.user_id == user_id and self.options.stop_unknown_computes:
                    handle = {"workspace_id": compute.workspace_id, "compute_id": compute.id}
                    found.append(Observed(handle, phase, None))
        await asyncio.to_thread(self._prune, entries, seen, workspace_ids)
        return found

    def _prune(self, entries: builtins.list[_Entry], live: set[str], listed: set[str]) -> None:
        now = time.time()
        for entry in entries:
            if entry.workspace_id not in listed:
                continue
            gone = entry.compute_id is not None and entry.compute_id not in live
            stale = entry.compute_id is None and now - entry.requested_at > _PENDING_TTL_S
            if gone or stale:
                self.ledger.forget(entry.context_id)

    # -- Backend: queries ----------------------------------------------------------------
    async def execute(self, handle: Handle, query: QuerySpec) -> QueryOutcome:
        """Forward the plan to the context and wait for its outcome (see the module
        docstring). Raises BackendError only if Polars Cloud cannot be reached."""
        workspace_id, compute_id = _handle_of(handle)
        refused = await asyncio.to_thread(self._check_plan, query)
        if refused is not None:
            return refused
        loop = asyncio.get_running_loop()
        deadline = loop.time() + query.timeout_s
        try:
            query_id = await self._once(self.client.submit, compute_id, query.plan, query.engine)
        except (cloud.CloudError, _Timeout) as exc:
            raise BackendError(f"Polars Cloud did not take the query: {exc}") from None
        log.info("query %s runs on Polars Cloud as %s", query.query_id, query_id)
        try:
            status = await self._wait(workspace_id, query_id, deadline)
        except asyncio.CancelledError:
            self._cancel_soon(workspace_id, query_id)
            raise
        if status is None:
            self._cancel_soon(workspace_id, query_id)
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
                with contextlib.suppress(cloud.CloudError, _Timeout, BackendError):
                    errors = (await self._once(self.client.query_output, query_id)).errors
            error_type, message = cloud.parse_query_errors(errors)
            return QueryOutcome(ok=False, error_type=error_type, error_message=message)
        try:
            output = await self._safe("query result", self.client.query_output, query_id)
        except cloud.CloudError as exc:
            raise BackendError(f"the query's result is gone: {exc.message}") from None
        if query.target is not QueryTarget.COLLECT:
            where = ", ".join(output.locations) or None
            return QueryOutcome(ok=True, rows=output.rows, output=where)
        return await asyncio.to_thread(self._fetch_result, query, output)

    def _check_plan(self, query: QuerySpec) -> QueryOutcome | None:
        try:
            info = plan_guard.inspect(query.plan, allow_python_udfs=query.allow_python_udfs)
            plan_guard.check_access(info, query.target, query.data_roots, query.denied_paths)
        except plan_guard.PlanError as exc:
            return QueryOutcome(ok=False, error_type=exc.type, error_message=exc.message)
        return None

    async def _wait(
        self, workspace_id: str, query_id: str, deadline: float
    ) -> cloud.QueryStatus | None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            try:
                status = await self._safe(
                    "query status", self.client.query_status, workspace_id, query_id
                )
            except cloud.CloudError as exc:
                raise BackendError(f"Polars Cloud lost the query: {exc.message}") from None
            if status.status in cloud.QUERY_DONE:
                return status
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(min(delay, max(0.0, deadline - loop.time())))
            delay = min(1.0, delay * 1.5)

    def _cancel_soon(self, workspace_id: str, query_id: str) -> None:
        """Cancel on Polars Cloud without holding up the task being cancelled."""

        def cancel() -> None:
            try:
                self._authorized(self.client.cancel, workspace_id, query_id)
                log.info("cancelled Polars Cloud query %s", query_id)
            except Exception as exc:
                log.warning("could not cancel Polars Cloud query %s: %s", query_id, exc)
            finally:
                self._cancels.discard(thread)

        thread = threading.Thread(target=cancel, name=f"pc-cancel-{query_id}", daemon=True)
        self._cancels.add(thread)
        thread.start()

    def _fetch_result(self, query: QuerySpec, output: cloud.QueryOutput) -> QueryOutcome:
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
        path = Path(query.result_path)
        tmp = path.with_name(path.name + ".part")
        try:
            reader(list(output.locations)).sink_ipc(tmp)
            size = tmp.stat().st_size
            if size > query.max_result_bytes:
                tmp.unlink(missing_ok=True)
                return QueryOutcome(
                    ok=False,
                    error_type="ResultTooLarge",
                    error_message=f"the result is {size} bytes, more than the "
                    f"{query.max_result_bytes} a collect may return; sink it to storage "
                    "instead",
                )
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

    async def close(self) -> None:
        await asyncio.to_thread(self.provider.close)
