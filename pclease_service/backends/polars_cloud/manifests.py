"""Starts through Polars Cloud manifests: an idempotent start by name.

A manifest is a named, registered compute spec; Polars Cloud keeps at most one cluster per
manifest, and starting a manifest whose cluster is live answers that cluster. So a start
whose answer was lost, that timed out, or that a restarted service makes again reconnects
to the cluster the first request made instead of starting a second one, and the computes
Polars Cloud lists carry the manifest's name, so the backend can tell which are its own
without a ledger.

**Names and slots.** A context of profile ``P`` is started through the manifest
``<instance>-<P>-<n>`` (``instance_name``, then the profile, then its *slot* ``n``): the
default instance gives ``pclease-small-0``, ``pclease-small-1``, ... Each manifest records
in its environment variables (the one registered field Polars Cloud returns as it was
sent) the context it was registered for and the deployment, ``PCLEASE_CONTEXT_ID`` and
``PCLEASE_INSTANCE``; the compute sees them as plain environment variables.

A start of context ``C`` looks at the profile's manifests from slot 0 up to the first name
not registered, and takes

1. the slot registered for ``C`` (a start made again: after a restart, or a retry), else
2. the lowest *free* slot: registered for this deployment, without a live cluster, and not
   being started by this process, else
3. the first unregistered name.

It registers the slot for ``C`` with the profile's current spec (so a changed profile
takes effect at the next start of each slot; a slot whose cluster is live is reconnected as
it is and never re-registered), then starts it. A slot is freed when its cluster stops or
fails (Polars Cloud clears the manifest's ``live_cluster_id``); the manifest stays
registered for the next context, and the backend never unregisters one, so names stay
dense. A manifest registered for another deployment, or by hand, is never taken.

Slots are chosen under a lock per profile, in this process. Two processes (replicas)
starting contexts of one profile at once may both take the same free slot: the later
registration wins, and both starts answer one cluster. So after its start a context reads
its manifest again, and if the manifest names another context now, the cluster is that
context's: it leaves it alone and takes another slot (at most a few times). The manifest's
context is always the one the cluster belongs to, which is what :meth:`owners` reports.

**Which computes are ours.** :meth:`ManifestStarts.owners` maps each live compute named
``<instance>-...`` to the context its manifest was registered for, if the manifest's live
cluster is that compute and the manifest is this deployment's; a compute of one of our
manifests that is not its live cluster any more belongs to no context (the reconciler's
sweep stops it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pclease_service.backends.base import ContextSpec, Handle
from pclease_service.backends.polars_cloud.calls import (
    RETRY_DELAYS_S,
    CallTimeout,
    CloudCalls,
    NotSent,
)
from pclease_service.backends.polars_cloud.client import CloudError, Compute, Manifest
from pclease_service.config import POLARS_CLOUD_START_ATTEMPTS
from pclease_service.errors import BackendError

log = logging.getLogger("pclease.backends.polars_cloud")

CONTEXT_ENV = "PCLEASE_CONTEXT_ID"
INSTANCE_ENV = "PCLEASE_INSTANCE"
# A profile never has more live contexts than max_contexts (at most 1000).
_MAX_SLOTS = 1000
# How often a start takes another slot after another process took the one it chose.
_TAKEN_TRIES = 3


def manifest_name(instance: str, profile: str, slot: int) -> str:
    return f"{instance}-{profile}-{slot}"


def handle_for(workspace_id: str, compute_id: str, manifest: str) -> dict[str, Any]:
    return {"workspace_id": workspace_id, "compute_id": compute_id, "manifest": manifest}


class ManifestStarts:
    """Starts by manifest and the owners of named computes (see the module docstring)."""

    def __init__(self, calls: CloudCalls, instance: str) -> None:
        self.calls = calls
        self.instance = instance
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Slots this process is starting: (workspace id, manifest name) -> context id.
        self._starting: dict[tuple[str, str], str] = {}

    async def _find(self, workspace_id: str, name: str) -> Manifest | None:
        try:
            found: Manifest = await self.calls.safe(
                "manifest lookup", "find_manifest", workspace_id, name
            )
        except CloudError as exc:
            if exc.not_found:
                return None
            raise BackendError(exc.message) from None
        return found

    def _ours(self, manifest: Manifest) -> bool:
        return manifest.env.get(INSTANCE_ENV) == self.instance

    async def _choose(
        self, spec: ContextSpec, workspace_id: str, lost: set[str]
    ) -> tuple[str, bool]:
        """(manifest name, whether its cluster is live) for ``spec``'s context; never one
        of ``lost``."""
        free: str | None = None
        for slot in range(_MAX_SLOTS):
            name = manifest_name(self.instance, spec.profile, slot)
            if self._starting.get((workspace_id, name), spec.context_id) != spec.context_id:
                continue  # another start of this process has it (maybe not registered yet)
            manifest = await self._find(workspace_id, name)
            if manifest is None:
                return free or name, False
            if not self._ours(manifest) or name in lost:
                continue
            if manifest.env.get(CONTEXT_ENV) == spec.context_id:
                return name, manifest.live_cluster_id is not None
            if free is None and manifest.live_cluster_id is None:
                free = name
        if free is not None:
            return free, False
        raise BackendError(
            f"profile {spec.profile!r} has {_MAX_SLOTS} manifests with live clusters; "
            "no slot is free"
        )

    async def start(self, spec: ContextSpec, workspace_id: str) -> Handle:
        lock = self._locks.setdefault((workspace_id, spec.profile), asyncio.Lock())
        lost: set[str] = set()
        for _ in range(_TAKEN_TRIES):
            async with lock:
                name, live = await self._choose(spec, workspace_id, lost)
                key = (workspace_id, name)
                self._starting[key] = spec.context_id
            try:
                if not live:
                    await self._register(spec, workspace_id, name)
                handle = await self._start(spec, workspace_id, name)
                if await self._still_ours(spec, workspace_id, name):
                    return handle
            finally:
                self._starting.pop(key, None)
            # Another process registered the slot for its context meanwhile: the cluster
            # is its; take another slot.
            log.warning(
                "manifest %s was registered for another context while context %s started "
                "it; taking another slot",
                name,
                spec.context_id,
            )
            lost.add(name)
        raise BackendError(
            f"the manifests of profile {spec.profile!r} kept being taken by other starts "
            f"({', '.join(sorted(lost))}); not starting"
        )

    async def _still_ours(self, spec: ContextSpec, workspace_id: str, name: str) -> bool:
        manifest = await self._find(workspace_id, name)
        return manifest is None or manifest.env.get(CONTEXT_ENV) == spec.context_id

    async def _register(self, spec: ContextSpec, workspace_id: str, name: str) -> None:
        options = spec.options
        env = {
            **dict(options.get("env") or {}),
            CONTEXT_ENV: spec.context_id,
            INSTANCE_ENV: self.instance,
        }
        last = ""
        for attempt in range(len(RETRY_DELAYS_S) + 1):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS_S[attempt - 1])
            try:
                await self.calls.once(
                    "register_manifest",
                    workspace_id,
                    name,
                    cpus=spec.cpus,
                    memory_gb=spec.memory_gb,
                    instance_type=spec.instance_type,
                    storage_gb=spec.storage_gb,
                    cluster_size=spec.cluster_size,
                    requirements=list(options.get("requirements") or []),
                    env=env,
                    labels=[f"{key}={value}" for key, value in sorted(spec.labels.items())],
                    idle_timeout_mins=int(options.get("idle_timeout_mins") or 30),
                )
                log.info("registered manifest %s for context %s", name, spec.context_id)
                return
            except NotSent as exc:
                raise BackendError(str(exc)) from None
            except CloudError as exc:  # registering again is safe: it replaces the specs
                last = exc.message
            except CallTimeout as exc:
                last = str(exc)
            log.warning("registering manifest %s failed (attempt %d): %s", name, attempt + 1, last)
        raise BackendError(f"Polars Cloud refused to register manifest {name}: {last}")

    async def _start(self, spec: ContextSpec, workspace_id: str, name: str) -> Handle:
        last = ""
        for attempt in range(POLARS_CLOUD_START_ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_DELAYS_S[min(attempt - 1, len(RETRY_DELAYS_S) - 1)])
            try:
                compute: Compute = await self.calls.once("start_manifest", workspace_id, name)
            except NotSent as exc:
                raise BackendError(str(exc)) from None
            except (CloudError, CallTimeout) as exc:
                # Starting a manifest again is safe (one cluster per manifest): the answer
                # may have been lost, so look, and else ask again.
                last = exc.message if isinstance(exc, CloudError) else str(exc)
                log.warning(
                    "starting manifest %s for context %s failed (attempt %d): %s",
                    name,
                    spec.context_id,
                    attempt + 1,
                    last,
                )
                try:
                    manifest: Manifest | None = await self.calls.once(
                        "find_manifest", workspace_id, name
                    )
                except (CloudError, CallTimeout):
                    continue  # the next attempt's answer tells
                if manifest is not None and manifest.live_cluster_id is not None:
                    if manifest.env.get(CONTEXT_ENV) != spec.context_id:
                        break  # re-registered for another context meanwhile
                    log.info("manifest %s did start %s", name, manifest.live_cluster_id)
                    return handle_for(workspace_id, manifest.live_cluster_id, name)
                continue
            log.info(
                "Polars Cloud compute %s runs manifest %s for context %s",
                compute.id,
                name,
                spec.context_id,
            )
            return handle_for(workspace_id, compute.id, name)
        raise BackendError(
            f"Polars Cloud refused to start manifest {name} {POLARS_CLOUD_START_ATTEMPTS} "
            f"times: {last}"
        )

    def named(self, compute: Compute) -> bool:
        """Whether ``compute`` was started from a manifest of this deployment's naming."""
        return bool(compute.name) and str(compute.name).startswith(f"{self.instance}-")

    async def owners(
        self, workspace_id: str, computes: Iterable[Compute]
    ) -> Mapping[str, tuple[Handle, str | None]]:
        """compute id -> (handle, context id or None) for the live computes of this
        deployment's manifests (see the module docstring); computes whose manifest cannot
        be read, or is not ours, are left out."""
        found: dict[str, tuple[Handle, str | None]] = {}
        for compute in computes:
            if not self.named(compute):
                continue
            name = str(compute.name)
            manifest = await self._find(workspace_id, name)
            if manifest is None or not self._ours(manifest):
                continue
            context_id = (
                manifest.env.get(CONTEXT_ENV) if manifest.live_cluster_id == compute.id else None
            )
            found[compute.id] = (handle_for(workspace_id, compute.id, name), context_id)
        return found
