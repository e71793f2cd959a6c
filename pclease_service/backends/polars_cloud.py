"""A backend whose contexts are Polars Cloud compute contexts (proxy mode).

Talks to Polars Cloud through the pinned ``polars-cloud`` client; every call into its
undocumented layer is in ``_polars_cloud_client`` (read its docstring for why and for the
client behaviour this relies on). Blocking client calls run on a small thread pool of the
backend's own (so calls abandoned at their timeout never crowd out the event loop's default
executor), each bounded by ``polars_cloud.request_timeout_s``.

**Auth.** The service, not the client, holds the service account: a
:class:`~service.credentials.TokenProvider` does the OAuth2 exchange and the backend puts
only the short-lived access token in ``POLARS_CLOUD_ACCESS_TOKEN``, which the client reads
on every call. Before each call the backend asks the provider for a token (refreshed
before it expires); when Polars Cloud answers 401 it invalidates that token (the provider
re-reads the source, so a rotated secret takes effect) and retries the call once. The
client secret never reaches the client: the backend removes ``POLARS_CLOUD_CLIENT_ID`` and
``POLARS_CLOUD_CLIENT_SECRET`` (and the env source's variables, which that source read
once) from ``os.environ`` before the client is first used, because the client, handed no
token, would do its own client-credentials exchange with them.

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
- a live compute that the service account started and no entry knows, if exactly one
  pending entry of the same workspace could have asked for it and it is the only such
  compute for that entry (same cpus, memory and cluster size, requested after the entry);
  the entry is completed, so the reconciler adopts or stops it. Nothing is matched in a
  workspace while a start of this process is still waiting for its answer there: until it
  has recorded its compute, that compute cannot be told from the one a lost answer made.
  A start that fails before sending its request (credentials) forgets its entry, so a
  stale entry never claims a compute that someone else started;
- with ``polars_cloud.stop_unknown_computes`` on, any other live compute the service
  account started, without a context id, so the reconciler stops it. That setting is for
  a service account this deployment has to itself: computes the account starts elsewhere
  would count as orphans. Off (the default), they are left alone and Polars Cloud's own
  ``idle_timeout_mins`` is the backstop for a lost ledger.

**Failures.** Status, list and stop are retried on errors (they are safe to repeat); a
stop whose compute has vanished succeeds, and one workspace that cannot be listed does not
keep :meth:`list` from reporting the others. A start is retried only after listing shows
that the failed attempt did not create a compute; a start that timed out is not retried
(its request may still land), and its pending ledger entry lets the next sweep find what it
created. ``backend_call_timeout_s`` is checked at startup to cover the slowest start.

**Queries** go through the client's proxy-mode submit with the plan bytes exactly as the
client sent them, after the same plan checks the local backend makes. Once submitted, a
query is cancelled on Polars Cloud whenever :meth:`execute` ends without its outcome
(task cancelled, timeout, Polars Cloud unreachable while waiting); a submission that timed
out is cancelled as soon as its answer arrives. ``collect`` results (the ``<in-memory>``
sink) are read from the location Polars Cloud reports and written as Arrow IPC to
``QuerySpec.result_path``; a local result larger on disk than ``max_result_bytes`` is
refused before it is read (other locations are checked after conversion).

Exceptions::

    BackendError    a call failed after its retries, the credentials do not work, or a
                    handle is unusable (a query that fails is an outcome, not an exception)
"""

from __future__ import annotations

import asyncio
import builtins
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pclease_service.backends import _polars_cloud_client as cloud
from pclease_service.backends import plan_guard
from pclease_service.backends.base import (
    LABEL_QUERY_ID,
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
from pclease_service.config import (
    POLARS_CLOUD_RETRY_DELAYS_S,
    POLARS_CLOUD_START_ATTEMPTS,
    Settings,
)
from pclease_service.credentials import CredentialsError, CredentialStatus, TokenProvider
from pclease_service.credentials.env import EnvSource

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
_RETRY_DELAYS_S = POLARS_CLOUD_RETRY_DELAYS_S
_START_ATTEMPTS = POLARS_CLOUD_START_ATTEMPTS
# A compute's request_time may precede our clock's idea of when we asked by this much.
_CLOCK_SKEW_S = 120.0
# Pending ledger entries nobody claimed are dropped after this long.
_PENDING_TTL_S = 3600.0
# Threads for blocking client calls: enough for a few starts, polls and cancels at once,
# few enough that calls abandoned at their timeout cannot pile up without bound.
_WORKERS = 8
# How long close() waits for query cancellations still on their way.
_CANCEL_GRACE_S = 5.0
# The variables the polars-cloud client would do its own token exchange with.
_CLIENT_CREDENTIAL_VARIABLES = ("POLARS_CLOUD_CLIENT_ID", "POLARS_CLOUD_CLIENT_SECRET")


class _Timeout(Exception):
    pass


class _NotSent(BackendError):
    """The call never reached Polars Cloud, or was refused at the door: it changed nothing."""


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


def _matches(entry: _Entry, compute: cloud.Compute, user_id: str) -> bool:
    """Whether ``compute`` could be what the start behind ``entry`` created. A shape Polars
    Cloud does not echo back (None) cannot rule a compute out."""
    ram_gb = math.ceil(entry.memory_gb) if entry.memory_gb is not None else None
    return (
        compute.user_id == user_id
        and compute.workspace_id == entry.workspace_id
        and compute.status in cloud.COMPUTE_LIVE
        and compute.request_time >= entry.requested_at - _CLOCK_SKEW_S
        and (entry.cpus is None or compute.cpus in (None, entry.cpus))
        and (ram_gb is None or compute.ram_gb in (None, ram_gb))
        and compute.cluster_size == entry.cluster_size
    )


class PolarsCloudBackend(Backend):
    """Polars Cloud compute contexts; see the module docstring."""

    kind = "polars_cloud"
    stop_on_shutdown = False
    list_is_cheap = False

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
        hidden = set(_CLIENT_CREDENTIAL_VARIABLES)
        if isinstance(provider.source, EnvSource):
            hidden.update(provider.source.variables)  # read once, when the source was made
        cloud.prepare_environment(
            self.options.api_addr, self.state_dir / "client", remove=sorted(hidden)
        )
        self._client = client
        self._user_id: str | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=_WORKERS, thread_name_prefix="pclease-polars-cloud"
        )
        # Starts of this process not yet resolved, by workspace: context id -> whether its
        # request is still waiting for an answer (True) or the answer was lost (False).
        self._starts: dict[str, dict[str, bool]] = {}
        self._starts_changed = asyncio.Event()
        self._cancels: set[concurrent.futures.Future[None]] = set()
        self._cancels_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------
    @property
    def client(self) -> cloud.CloudClient:
        if self._client is None:
            self._client = cloud.CloudClient()
        return self._client

    def credential_status(self) -> CredentialStatus:
        return self.provider.status()

    def _credentials_failed(self, exc: CredentialsError) -> BackendError:
        return _NotSent(f"Polars Cloud credentials are not usable: {exc.message}")

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
                raise _NotSent(
                    "Polars Cloud refused a fresh access token for the service account from "
                    f"{self.provider.source.describe()} ({error.message}); check that the "
                    "service account may use the workspace"
                )
            raise error
        raise AssertionError("unreachable")

    def _submit(
        self, fn: Callable[..., T], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        try:
            return self._executor.submit(self._authorized, fn, *args, **kwargs)
        except RuntimeError:  # shut down
            raise BackendError("the polars_cloud backend is closed") from None

    async def _once(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        timeout_s = self.options.request_timeout_s
        future = self._submit(fn, *args, **kwargs)
        try:
            # A timeout cancels the call if it has not begun; one under way runs out in
            # its thread and its answer is dropped.
            return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)
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
        # Marked before the entry exists, so no listing ever matches it while unresolved.
        starts = self._starts.setdefault(workspace_id, {})
        starts[spec.context_id] = True
        try:
            await asyncio.to_thread(self.ledger.write, entry)
            return await self._start(spec, entry, user_id, starts)
        finally:
            starts.pop(spec.context_id, None)
            self._start_changed()

    def _start_changed(self) -> None:
        self._starts_changed.set()
        self._starts_changed = asyncio.Event()

    async def _start(
        self, spec: ContextSpec, entry: _Entry, user_id: str, starts: dict[str, bool]
    ) -> Handle:
        options = spec.options
        labels = [f"{key}={value}" for key, value in sorted(spec.labels.items())]
        last = ""
        for attempt in range(_START_ATTEMPTS):
            if attempt:
                await asyncio.sleep(_RETRY_DELAYS_S[min(attempt - 1, len(_RETRY_DELAYS_S) - 1)])
            starts[spec.context_id] = True
            try:
                compute_id = await self._once(
                    self.client.start,
                    entry.workspace_id,
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
            except _NotSent as exc:
                # Nothing was started: an entry left behind could only ever claim a
                # compute someone else started.
                await asyncio.to_thread(self.ledger.forget, spec.context_id)
                raise BackendError(str(exc)) from None
            except _Timeout as exc:
                # The request may still create a compute; the pending entry lets the next
                # sweep find it. Another attempt now could make a second one.
                raise BackendError(
                    f"{exc} to the start request; not retrying, so that no second context "
                    "is started (a context it created is found and stopped by the next sweep)"
                ) from None
            except cloud.CloudError as exc:
                starts[spec.context_id] = False
                self._start_changed()
                last = exc.message
                log.warning(
                    "starting context %s failed (attempt %d): %s",
                    spec.context_id,
                    attempt + 1,
                    last,
                )
                found = await self._find_started(entry, user_id, last)
                if found is not None:
                    log.info("the failed start of %s did create compute %s", spec.context_id, found)
                    return {"workspace_id": entry.workspace_id, "compute_id": found}
                continue
            done = _Entry(**{**entry.__dict__, "compute_id": compute_id})
            await asyncio.to_thread(self.ledger.write, done)
            log.info("started Polars Cloud compute %s for context %s", compute_id, spec.context_id)
            return done.handle()
        await asyncio.to_thread(self.ledger.forget, spec.context_id)
        raise BackendError(
            f"Polars Cloud refused to start the context {_START_ATTEMPTS} times: {last}"
        )

    def _others_unresolved(self, entry: _Entry, *, waiting_only: bool) -> bool:
        starts = self._starts.get(entry.workspace_id, {})
        return any(
            waiting or not waiting_only
            for context_id, waiting in starts.items()
            if context_id != entry.context_id
        )

    async def _find_started(self, entry: _Entry, user_id: str, failure: str) -> str | None:
        """The compute a failed start request created after all, if it can be told apart;
        None if listing shows it created nothing. Raises BackendError (keeping the entry
        for the sweep) when it cannot tell."""
        # Other starts still waiting for their answer record their compute soon; until
        # then it looks exactly like ours.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.request_timeout_s
        while self._others_unresolved(entry, waiting_only=True):
            changed = self._starts_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.0, deadline - loop.time()))
            if loop.time() >= deadline:
                break
        try:
            computes = await self._once(self.client.list, entry.workspace_id)
        except (cloud.CloudError, _Timeout) as exc:
            raise BackendError(
                f"start failed ({failure}) and listing the workspace to see whether it "
                f"created a context failed too ({exc}); not retrying"
            ) from None
        known = {e.compute_id for e in await asyncio.to_thread(self.ledger.entries)}
        candidates = [c for c in computes if c.id not in known and _matches(entry, c, user_id)]
        if not candidates:
            return None
        if len(candidates) > 1 or self._others_unresolved(entry, waiting_only=False):
            raise BackendError(
                f"start failed ({failure}), and the workspace has a compute it may have "
                "created that cannot be told apart from another start's; not retrying (the "
                "next sweep finds and stops it once that is clear)"
            )
        done = _Entry(**{**entry.__dict__, "compute_id": candidates[0].id})
        await asyncio.to_thread(self.ledger.write, done)
        return candidates[0].id

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
            # Already ended or gone (stopping a stopped compute may be refused): success.
            try:
                compute = await self._once(self.client.get, workspace_id, compute_id)
            except cloud.CloudError as exc:
                if not exc.not_found:
                    raise BackendError(
                        f"could not stop Polars Cloud compute {compute_id}; retrying later"
                    ) from None
            except _Timeout:
                raise BackendError(
                    f"could not stop Polars Cloud compute {compute_id}; retrying later"
                ) from None
            else:
                if compute.status in cloud.COMPUTE_LIVE:
                    raise
        await asyncio.to_thread(self._forget_compute, compute_id)

    def _forget_compute(self, compute_id: str) -> None:
        for entry in self.ledger.entries():
            if entry.compute_id == compute_id:
                self.ledger.forget(entry.context_id)

    async def list(self) -> builtins.list[Observed]:
        """See the module docstring. A workspace that cannot be looked up or listed is
        skipped (and logged); BackendError only if none could be listed."""
        names = {p.workspace for p in self.settings.profiles.values() if p.workspace}
        if self.options.workspace:
            names.add(self.options.workspace)
        problems: builtins.list[str] = []
        workspace_ids: set[str] = set()
        for name in sorted(names):
            try:
                workspace_ids.add(await self._workspace_id(name))
            except BackendError as exc:
                if isinstance(exc, _NotSent):
                    raise
                problems.append(f"workspace {name!r}: {exc}")
        entries = await asyncio.to_thread(self.ledger.entries)
        workspace_ids |= {e.workspace_id for e in entries}
        user_id = await self._our_user() if workspace_ids else ""
        by_compute = {e.compute_id: e for e in entries if e.compute_id is not None}
        found: builtins.list[Observed] = []
        seen: set[str] = set()
        listed: set[str] = set()
        for workspace_id in sorted(workspace_ids):
            try:
                computes = await self._safe("list", self.client.list, workspace_id)
            except (BackendError, cloud.CloudError) as exc:
                if isinstance(exc, _NotSent):
                    raise
                problems.append(f"workspace {workspace_id}: {exc}")
                continue
            listed.add(workspace_id)
            seen.update(c.id for c in computes)
            live = [c for c in computes if c.status in cloud.COMPUTE_LIVE]
            claimed = await self._claim(workspace_id, live, entries, by_compute, user_id)
            for compute in sorted(live, key=lambda c: c.request_time):
                phase = _PHASES.get(compute.status, Phase.STARTING)
                entry = by_compute.get(compute.id) or claimed.get(compute.id)
                if entry is not None:
                    found.append(Observed(entry.handle(), phase, entry.context_id))
                elif compute.user_id == user_id and self.options.stop_unknown_computes:
                    handle = {"workspace_id": compute.workspace_id, "compute_id": compute.id}
                    found.append(Observed(handle, phase, None))
        for problem in problems:
            log.warning("cannot list Polars Cloud contexts in %s", problem)
        if problems and not listed:
            raise BackendError("; ".join(problems))
        await asyncio.to_thread(self._prune, entries, seen, listed)
        return found

    async def _claim(
        self,
        workspace_id: str,
        live: builtins.list[cloud.Compute],
        entries: builtins.list[_Entry],
        by_compute: Mapping[str, _Entry],
        user_id: str,
    ) -> dict[str, _Entry]:
        """Pending entries of ``workspace_id`` completed with the one compute each could
        only have come from (see the module docstring)."""
        if self._starts.get(workspace_id):
            return {}
        pending = [e for e in entries if e.compute_id is None and e.workspace_id == workspace_id]
        unknown = [c for c in live if c.id not in by_compute]
        claimed: dict[str, _Entry] = {}
        for entry in pending:
            candidates = [c for c in unknown if _matches(entry, c, user_id)]
            if len(candidates) != 1:
                continue
            compute = candidates[0]
            if sum(_matches(other, compute, user_id) for other in pending) != 1:
                continue
            done = _Entry(**{**entry.__dict__, "compute_id": compute.id})
            await asyncio.to_thread(self.ledger.write, done)
            claimed[compute.id] = done
        return claimed

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
        query_id = await self._submit_query(workspace_id, compute_id, query)
        log.info("query %s runs on Polars Cloud as %s", query.query_id, query_id)
        try:
            status = await self._wait(workspace_id, query_id, deadline)
        except BaseException:
            # Cancelled, or Polars Cloud stopped answering: the query must not run on.
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

    async def _submit_query(self, workspace_id: str, compute_id: str, query: QuerySpec) -> str:
        """The query's Polars Cloud id. A submission that is abandoned (timeout, task
        cancelled) may still land: the query is then cancelled as soon as it is known."""
        timeout_s = self.options.request_timeout_s
        labels = [f"{LABEL_QUERY_ID}={query.query_id}"]
        labels += [f"{key}={value}" for key, value in sorted(query.labels.items())]
        future = self._submit(self.client.submit, compute_id, query.plan, query.engine, labels)
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout_s)
        except cloud.CloudError as exc:
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
        self._cancel_soon(workspace_id, done.result())

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
        """Cancel on Polars Cloud without holding up the task being cancelled (retried:
        cancelling is safe to repeat)."""

        def cancel() -> None:
            last: Exception | None = None
            for delay in (0.0, *_RETRY_DELAYS_S):
                time.sleep(delay)
                try:
                    self._authorized(self.client.cancel, workspace_id, query_id)
                    log.info("cancelled Polars Cloud query %s", query_id)
                    return
                except cloud.CloudError as exc:
                    if exc.not_found:
                        return
                    last = exc
                except Exception as exc:
                    last = exc
            log.warning("could not cancel Polars Cloud query %s: %s", query_id, last)

        try:
            future = self._executor.submit(cancel)
        except RuntimeError:
            log.warning("could not cancel Polars Cloud query %s: the backend is closed", query_id)
            return
        with self._cancels_lock:
            self._cancels.add(future)
        future.add_done_callback(self._cancel_done)

    def _cancel_done(self, future: concurrent.futures.Future[None]) -> None:
        with self._cancels_lock:
            self._cancels.discard(future)

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

    async def close(self) -> None:
        with self._cancels_lock:
            cancels = list(self._cancels)
        if cancels:
            # Cancellations on their way get a moment to reach Polars Cloud.
            await asyncio.to_thread(concurrent.futures.wait, cancels, _CANCEL_GRACE_S)
        self._executor.shutdown(wait=False, cancel_futures=True)
        await asyncio.to_thread(self.provider.close)
