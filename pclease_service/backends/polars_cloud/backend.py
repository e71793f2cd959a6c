"""The polars_cloud backend's contexts: start, status, stop, list (see the package
docstring for the ledger, lost starts and which computes count as ours)."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from pclease_service.backends.base import (
    Backend,
    Capabilities,
    ContextSpec,
    Handle,
    Observation,
    Observed,
    Phase,
    QueryOutcome,
    QuerySpec,
    StartLedger,
)
from pclease_service.backends.polars_cloud.calls import (
    RETRY_DELAYS_S,
    CallTimeout,
    CloudCalls,
    NotSent,
)
from pclease_service.backends.polars_cloud.client import COMPUTE_LIVE, CloudError, Compute
from pclease_service.backends.polars_cloud.host import ClientHost, client_environment
from pclease_service.backends.polars_cloud.ledger import Entry, handle_of, legacy_entries, matches
from pclease_service.backends.polars_cloud.manifests import ManifestStarts
from pclease_service.backends.polars_cloud.queries import CloudQueries
from pclease_service.config import POLARS_CLOUD_START_ATTEMPTS, Profile, Settings
from pclease_service.credentials import TokenProvider
from pclease_service.credentials.env import EnvSource
from pclease_service.errors import BackendError

log = logging.getLogger("pclease.backends.polars_cloud")

_PHASES = {
    "Starting": Phase.STARTING,
    "Idle": Phase.RUNNING,
    "Running": Phase.RUNNING,
    "Stopping": Phase.STOPPING,
    "Stopped": Phase.STOPPED,
    "Failed": Phase.FAILED,
}
_START_ATTEMPTS = POLARS_CLOUD_START_ATTEMPTS
# Pending ledger entries nobody claimed are dropped after this long.
_PENDING_TTL_S = 3600.0
# How often a start waits to see whether another replica's start request answered.
_RESOLVE_POLL_S = 0.5


class PolarsCloudBackend(Backend):
    """Polars Cloud compute contexts; see the package docstring."""

    kind = "polars_cloud"
    capabilities = Capabilities(
        stop_on_shutdown=False, list_is_cheap=False, distributed_queries=True
    )

    def __init__(
        self,
        settings: Settings,
        provider: TokenProvider,
        *,
        ledger: StartLedger,
        state_dir: Path | None = None,
        host: ClientHost | None = None,
    ) -> None:
        self.settings = settings
        self.options = settings.polars_cloud
        self.provider = provider
        self.state_dir = (state_dir or settings.data_dir / "polars_cloud").resolve()
        self.ledger = ledger
        self._legacy_imported = False
        if host is None:
            config_dir = self.state_dir / "client"
            config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The env source read its variables once, when it was made; the client's
            # process gets neither them nor any other credential.
            hidden = (
                set(provider.source.variables) if isinstance(provider.source, EnvSource) else set()
            )
            host = ClientHost(client_environment(self.options.api_addr, config_dir, hidden=hidden))
        self.host = host
        self.calls = CloudCalls(provider, host, self.options.request_timeout_s)
        self.queries = CloudQueries(self.calls)
        # Always there to recognise the computes of this deployment's manifests (a
        # deployment that turned use_manifests off may still run some); starts use it
        # only with use_manifests on.
        self.manifests = ManifestStarts(self.calls, settings.instance_name)
        self._user_id: str | None = None
        # Starts of this process not yet resolved, by workspace: context id -> whether its
        # request is still waiting for an answer (True) or the answer was lost (False).
        self._starts: dict[str, dict[str, bool]] = {}
        self._starts_changed = asyncio.Event()

    @property
    def credentials(self) -> TokenProvider:
        return self.provider

    def context_options(self, profile: Profile) -> Mapping[str, Any]:
        return profile.polars_cloud.model_dump()

    async def _our_user(self) -> str:
        if self._user_id is None:
            self._user_id = await self.calls.safe("user lookup", "user_id")
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
            workspace_id: str = await self.calls.safe("workspace lookup", "workspace_id", name)
            return workspace_id
        except CloudError as exc:
            raise BackendError(exc.message) from None

    # -- Backend: contexts ---------------------------------------------------------------
    async def start(self, spec: ContextSpec) -> Handle:
        workspace_id = await self._workspace_id(self._workspace_name(spec.workspace))
        if self.options.use_manifests:
            return await self.manifests.start(spec, workspace_id)
        user_id = await self._our_user()
        await self._import_legacy()
        earlier = await self._earlier_start(spec, user_id)
        if earlier is not None:
            return earlier
        entry = Entry(
            context_id=spec.context_id,
            workspace_id=workspace_id,
            compute_id=None,
            requested_at=time.time(),
            cpus=spec.cpus,
            memory_gb=spec.memory_gb,
            cluster_size=spec.cluster_size,
            answer_due_at=self._answer_due_at(),
            fence=spec.fence,
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

    def _answer_due_at(self) -> float:
        """Until when a start request sent now may still answer (one request's timeout,
        and a little for the answer to be recorded)."""
        return time.time() + self.calls.timeout_s + 2.0

    async def _earlier_start(self, spec: ContextSpec, user_id: str) -> Handle | None:
        """The compute an earlier start of this context made, if it made one: another
        replica (dead, or deposed by a newer claim) may have sent the request and never
        recorded its answer. Waits until that request can no longer answer, then looks.
        None if there was no earlier start or it made nothing."""
        while True:
            earlier = next(
                (
                    e
                    for e in await asyncio.to_thread(self.ledger.entries)
                    if e.context_id == spec.context_id
                ),
                None,
            )
            if earlier is None:
                return None
            if earlier.fence > spec.fence:
                raise BackendError(
                    f"context {spec.context_id} was claimed again (fence {earlier.fence} > "
                    f"{spec.fence}); this replica's start is stale and is not made"
                )
            if earlier.compute_id is not None:
                log.info(
                    "context %s was already started (compute %s); using it",
                    spec.context_id,
                    earlier.compute_id,
                )
                return earlier.handle()
            wait_s = earlier.answer_due_at - time.time()
            if wait_s <= 0:
                break
            await asyncio.sleep(min(wait_s, _RESOLVE_POLL_S))
        found = await self._find_started(earlier, user_id, "an earlier start's answer was lost")
        if found is not None:
            log.info("an earlier start of %s did create compute %s", spec.context_id, found)
            return {"workspace_id": earlier.workspace_id, "compute_id": found}
        await asyncio.to_thread(self.ledger.forget, earlier)
        return None

    def _start_changed(self) -> None:
        self._starts_changed.set()
        self._starts_changed = asyncio.Event()

    async def _start(
        self, spec: ContextSpec, entry: Entry, user_id: str, starts: dict[str, bool]
    ) -> Handle:
        options = spec.options
        labels = [f"{key}={value}" for key, value in sorted(spec.labels.items())]
        last = ""
        for attempt in range(_START_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS_S[min(attempt - 1, len(RETRY_DELAYS_S) - 1)])
                entry = replace(entry, answer_due_at=self._answer_due_at())
                await asyncio.to_thread(self.ledger.write, entry)
            starts[spec.context_id] = True
            try:
                compute_id = await self.calls.once(
                    "start",
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
            except NotSent as exc:
                # Nothing was started: an entry left behind could only ever claim a
                # compute someone else started.
                await asyncio.to_thread(self.ledger.forget, entry)
                raise BackendError(str(exc)) from None
            except CallTimeout as exc:
                # The request may still create a compute; the pending entry lets the next
                # sweep (of any replica) find it, from now on: nobody will record an
                # answer. Another attempt now could make a second one.
                lost = replace(entry, answer_due_at=time.time())
                await asyncio.to_thread(self.ledger.write, lost)
                raise BackendError(
                    f"{exc} to the start request; not retrying, so that no second context "
                    "is started (a context it created is found and stopped by the next sweep)"
                ) from None
            except CloudError as exc:
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
            done = replace(entry, compute_id=compute_id)
            await asyncio.to_thread(self.ledger.write, done)
            log.info("started Polars Cloud compute %s for context %s", compute_id, spec.context_id)
            return done.handle()
        await asyncio.to_thread(self.ledger.forget, entry)
        raise BackendError(
            f"Polars Cloud refused to start the context {_START_ATTEMPTS} times: {last}"
        )

    def _others_unresolved(self, entry: Entry, *, waiting_only: bool) -> bool:
        starts = self._starts.get(entry.workspace_id, {})
        return any(
            waiting or not waiting_only
            for context_id, waiting in starts.items()
            if context_id != entry.context_id
        )

    async def _find_started(self, entry: Entry, user_id: str, failure: str) -> str | None:
        """The compute a failed start request created after all, if it can be told apart;
        None if listing shows it created nothing. Raises BackendError (keeping the entry
        for the sweep) when it cannot tell."""
        # Other starts still waiting for their answer record their compute soon; until
        # then it looks exactly like ours.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.calls.timeout_s
        while self._others_unresolved(entry, waiting_only=True):
            changed = self._starts_changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), max(0.0, deadline - loop.time()))
            if loop.time() >= deadline:
                break
        try:
            computes: builtins.list[Compute] = await self.calls.once("list", entry.workspace_id)
        except (CloudError, CallTimeout) as exc:
            raise BackendError(
                f"start failed ({failure}) and listing the workspace to see whether it "
                f"created a context failed too ({exc}); not retrying"
            ) from None
        entries = await asyncio.to_thread(self.ledger.entries)
        known = {e.compute_id for e in entries}
        candidates = [c for c in computes if c.id not in known and matches(entry, c, user_id)]
        if not candidates:
            return None
        # Another replica's pending start could have made the same compute.
        rivals = [
            e
            for e in entries
            if e.compute_id is None
            and e.context_id != entry.context_id
            and any(matches(e, c, user_id) for c in candidates)
        ]
        if len(candidates) > 1 or rivals or self._others_unresolved(entry, waiting_only=False):
            raise BackendError(
                f"start failed ({failure}), and the workspace has a compute it may have "
                "created that cannot be told apart from another start's; not retrying (the "
                "next sweep finds and stops it once that is clear)"
            )
        found: Compute = candidates[0]
        done = replace(entry, compute_id=found.id)
        await asyncio.to_thread(self.ledger.write, done)
        return found.id

    async def status(self, handle: Handle) -> Observation:
        workspace_id, compute_id = handle_of(handle)
        try:
            compute = await self.calls.safe("status", "get", workspace_id, compute_id)
        except CloudError as exc:  # not found
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
        workspace_id, compute_id = handle_of(handle)
        try:
            await self.calls.safe("stop", "stop", workspace_id, compute_id)
        except CloudError:  # not found: nothing left to stop
            pass
        except BackendError:
            # Already ended or gone (stopping a stopped compute may be refused): success.
            try:
                compute = await self.calls.once("get", workspace_id, compute_id)
            except CloudError as exc:
                if not exc.not_found:
                    raise BackendError(
                        f"could not stop Polars Cloud compute {compute_id}; retrying later"
                    ) from None
            except CallTimeout:
                raise BackendError(
                    f"could not stop Polars Cloud compute {compute_id}; retrying later"
                ) from None
            else:
                if compute.status in COMPUTE_LIVE:
                    raise
        await asyncio.to_thread(self._forget_compute, compute_id)

    def _forget_compute(self, compute_id: str) -> None:
        for entry in self.ledger.entries():
            if entry.compute_id == compute_id:
                self.ledger.forget(entry)

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
                if isinstance(exc, NotSent):
                    raise
                problems.append(f"workspace {name!r}: {exc}")
        await self._import_legacy()
        entries = await asyncio.to_thread(self.ledger.entries)
        workspace_ids |= {e.workspace_id for e in entries}
        user_id = await self._our_user() if workspace_ids else ""
        by_compute = {e.compute_id: e for e in entries if e.compute_id is not None}
        found: builtins.list[Observed] = []
        seen: set[str] = set()
        listed: set[str] = set()
        for workspace_id in sorted(workspace_ids):
            try:
                computes: builtins.list[Compute] = await self.calls.safe(
                    "list", "list", workspace_id
                )
            except (BackendError, CloudError) as exc:
                if isinstance(exc, NotSent):
                    raise
                problems.append(f"workspace {workspace_id}: {exc}")
                continue
            live = [c for c in computes if c.status in COMPUTE_LIVE]
            try:
                named = await self.manifests.owners(workspace_id, live)
            except BackendError as exc:
                if isinstance(exc, NotSent):
                    raise
                problems.append(f"workspace {workspace_id}: {exc}")
                continue
            listed.add(workspace_id)
            seen.update(c.id for c in computes)
            for compute in sorted(live, key=lambda c: c.request_time):
                if compute.id in named:
                    handle, context_id = named[compute.id]
                    phase = _PHASES.get(compute.status, Phase.STARTING)
                    found.append(Observed(handle, phase, context_id))
            # Computes of manifests are never a ledger entry's, nor unknown.
            live = [c for c in live if c.id not in named and not self.manifests.named(c)]
            claimed = await self._claim(workspace_id, live, entries, by_compute, user_id)
            for compute in sorted(live, key=lambda c: c.request_time):
                phase = _PHASES.get(compute.status, Phase.STARTING)
                entry = by_compute.get(compute.id) or claimed.get(compute.id)
                if entry is not None:
                    found.append(Observed(entry.handle(), phase, entry.context_id))
                elif (
                    compute.user_id == user_id
                    and self.options.stop_unknown_computes
                    and not any(
                        matches(e, compute, user_id) for e in entries if e.compute_id is None
                    )
                ):
                    # Unknown, and no start still unresolved (of any replica) could have
                    # made it.
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
        live: builtins.list[Compute],
        entries: builtins.list[Entry],
        by_compute: Mapping[str, Entry],
        user_id: str,
    ) -> dict[str, Entry]:
        """Pending entries of ``workspace_id`` completed with the one compute each could
        only have come from (see the module docstring)."""
        if self._starts.get(workspace_id):
            return {}
        pending = [e for e in entries if e.compute_id is None and e.workspace_id == workspace_id]
        unknown = [c for c in live if c.id not in by_compute]
        claimed: dict[str, Entry] = {}
        now = time.time()
        for entry in pending:
            if entry.answer_due_at > now:
                continue  # its start request (on another replica) may still answer
            candidates = [c for c in unknown if matches(entry, c, user_id)]
            if len(candidates) != 1:
                continue
            compute = candidates[0]
            if sum(matches(other, compute, user_id) for other in pending) != 1:
                continue
            done = replace(entry, compute_id=compute.id)
            await asyncio.to_thread(self.ledger.write, done)
            claimed[compute.id] = done
        return claimed

    def _prune(self, entries: builtins.list[Entry], live: set[str], listed: set[str]) -> None:
        now = time.time()
        for entry in entries:
            if entry.workspace_id not in listed:
                continue
            gone = entry.compute_id is not None and entry.compute_id not in live
            stale = entry.compute_id is None and now - entry.requested_at > _PENDING_TTL_S
            if gone or stale:
                self.ledger.forget(entry)

    async def _import_legacy(self) -> None:
        """Entries an earlier release kept as files in ``data_dir``: into the ledger (an
        entry the ledger has already is newer), once per process."""
        if self._legacy_imported:
            return
        directory = self.state_dir / "ledger"

        def move() -> int:
            known = {e.context_id for e in self.ledger.entries()}
            moved = 0
            for path, entry in legacy_entries(directory):
                if entry.context_id not in known:
                    self.ledger.write(entry)
                    moved += 1
                path.unlink(missing_ok=True)
            return moved

        if moved := await asyncio.to_thread(move):
            log.info("moved %d start ledger entries from %s into the database", moved, directory)
        self._legacy_imported = True

    # -- Backend: queries ----------------------------------------------------------------
    async def execute(self, handle: Handle, query: QuerySpec) -> QueryOutcome:
        return await self.queries.execute(handle, query)

    async def close(self) -> None:
        await self.calls.close()
