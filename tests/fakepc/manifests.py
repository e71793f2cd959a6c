"""Manifests (named compute contexts) in the fake: registration, find, start by name, unregister.

What polars-cloud 0.12.0 sends (observed by pointing the unmodified client at this fake):

- ``ComputeContext(...).register(name)``: POST ``/api/v1/workspace/{W}/manifest`` with the
  start body's fields (``specs``, ``storage``, ``big_instance_storage``, ``cluster_size``,
  ``mode``, ``python_version`` ``{major, minor, patch}``, ``polars_version``, ``labels``,
  ``log_level``, ``idle_timeout_mins``, ``requirements_txt``, ``env_vars``) plus ``name``;
  answers a manifest.
- ``ComputeContext(name=...)``: GET ``/api/v1/workspace/{W}/manifest/find?name=...``; 404
  raises ``NotFoundError``.
- ``start`` of a named context: POST ``/api/v1/workspace/{W}/manifest/start`` with
  ``{name, python_version, polars_version}``; answers a compute.
- ``unregister()``: DELETE ``/api/v1/workspace/{W}/manifest?name=...``; an empty 200.

A manifest (the client's ``ManifestModel``, 20 fields) is ``id, workspace_id, name,
instance_type, req_ram_gb, req_cpu_cores, cpu_architectures, req_storage,
big_instance_type, req_big_instance_multiplier, req_big_instance_storage, cluster_size,
mode, idle_timeout_mins, log_level, polars_version, python_version`` (a string such as
``"3.11.7"``, which the client compares with its own), ``requirements_txt, env_vars,
live_cluster_id``. Labels are accepted and not returned.

Semantics: names are unique per workspace; registering a name again replaces its specs
(the manifest keeps its id and its live cluster). At most one cluster per manifest: a start
while its cluster is live (Starting, Idle, Running) answers that cluster and starts nothing;
``live_cluster_id`` is cleared once it stops or fails. A compute started from a manifest
carries the manifest's name (``name`` on the compute). The start knobs of the control plane
(``fail_starts``, ``lose_start_answers``, ``hang_start_answers_s``, ``start_delay_s``,
``start_ends_failed``) apply to manifest starts; a start that answers the live cluster
consumes none of them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from tests.fakepc.control import LIVE, NotFound, now

if TYPE_CHECKING:
    from tests.fakepc.control import ControlPlane

_SPEC_KEYS = (
    "specs",
    "storage",
    "big_instance_storage",
    "cluster_size",
    "mode",
    "python_version",
    "polars_version",
    "labels",
    "log_level",
    "idle_timeout_mins",
    "requirements_txt",
    "env_vars",
)


@dataclass
class Manifest:
    id: str
    workspace_id: str
    name: str
    body: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    live_cluster_id: str | None = None
    registrations: int = 1
    starts: list[str] = field(default_factory=list)  # compute id each start answered


def _version(value: Any) -> str:
    if isinstance(value, dict):
        return ".".join(str(value.get(part, 0)) for part in ("major", "minor", "patch"))
    return str(value or "")


class Manifests:
    """The manifests of the fake's workspace, under the control plane's lock."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self._by_name: dict[tuple[str, str], Manifest] = {}

    def clear(self) -> None:
        with self.plane._lock:
            self._by_name.clear()

    def register(self, workspace_id: str, body: dict[str, Any]) -> dict[str, Any]:
        name = str(body.get("name") or "")
        if not name:
            raise ValueError("a manifest needs a name")
        if not body.get("polars_version") or not body.get("python_version"):
            raise ValueError("a manifest needs polars_version and python_version")
        spec = {key: body.get(key) for key in _SPEC_KEYS}
        with self.plane._lock:
            found = self._by_name.get((workspace_id, name))
            if found is None:
                at = now()
                found = Manifest(str(uuid.uuid4()), workspace_id, name, spec, at, at)
                self._by_name[(workspace_id, name)] = found
            else:
                found.body = spec
                found.updated_at = now()
                found.registrations += 1
            return self.manifest_json(found)

    def _get(self, workspace_id: str, name: str) -> Manifest:
        found = self._by_name.get((workspace_id, name))
        if found is None:
            raise NotFound(f"no manifest named {name!r} in workspace {workspace_id}")
        self._refresh(found)
        return found

    def _refresh(self, m: Manifest) -> None:
        if m.live_cluster_id is None:
            return
        compute = self.plane._computes.get(m.live_cluster_id)
        if compute is not None:
            self.plane._advance(compute)
        if compute is None or compute.status not in LIVE:
            m.live_cluster_id = None

    def find(self, workspace_id: str, name: str) -> dict[str, Any]:
        with self.plane._lock:
            return self.manifest_json(self._get(workspace_id, name))

    def unregister(self, workspace_id: str, name: str) -> None:
        with self.plane._lock:
            self._get(workspace_id, name)
            del self._by_name[(workspace_id, name)]

    def live_cluster(self, workspace_id: str, name: str) -> str | None:
        """The live cluster of manifest ``name``, None if none (raises NotFound)."""
        with self.plane._lock:
            return self._get(workspace_id, name).live_cluster_id

    def start(self, workspace_id: str, user_id: str, name: str) -> tuple[str, bool]:
        """(compute id, whether it was started now): the manifest's live cluster if it has
        one, else a new compute from its specs. Raises NotFound."""
        with self.plane._lock:
            m = self._get(workspace_id, name)
            if m.live_cluster_id is not None:
                m.starts.append(m.live_cluster_id)
                return m.live_cluster_id, False
            body = {key: value for key, value in m.body.items() if value is not None}
            compute = self.plane.start_compute(workspace_id, user_id, body, name=name)
            m.live_cluster_id = compute.id
            m.starts.append(compute.id)
            return compute.id, True

    def manifest_json(self, m: Manifest) -> dict[str, Any]:
        body = m.body
        specs = body.get("specs") if isinstance(body.get("specs"), dict) else {}
        assert isinstance(specs, dict)
        return {
            "id": m.id,
            "workspace_id": m.workspace_id,
            "name": m.name,
            "instance_type": body.get("instance_type"),
            "req_ram_gb": specs.get("ram_gb"),
            "req_cpu_cores": specs.get("cpus"),
            "cpu_architectures": specs.get("cpu_architectures"),
            "req_storage": body.get("storage"),
            "big_instance_type": body.get("big_instance_type"),
            "req_big_instance_multiplier": specs.get("multiplier"),
            "req_big_instance_storage": body.get("big_instance_storage"),
            "cluster_size": body.get("cluster_size") or 1,
            "mode": body.get("mode") or "Proxy",
            "idle_timeout_mins": body.get("idle_timeout_mins"),
            "log_level": body.get("log_level") or "Info",
            "polars_version": str(body.get("polars_version") or ""),
            "python_version": _version(body.get("python_version")),
            "requirements_txt": body.get("requirements_txt"),
            "env_vars": dict(body.get("env_vars") or {}),
            "live_cluster_id": m.live_cluster_id,
        }

    def snapshot(self) -> list[dict[str, Any]]:
        """Every manifest as the client sees it, plus ``registrations`` (how often its name
        was registered), ``starts`` (the compute each start answered) and ``labels``."""
        with self.plane._lock:
            out = []
            for m in self._by_name.values():
                self._refresh(m)
                out.append(
                    {
                        **self.manifest_json(m),
                        "labels": list(m.body.get("labels") or []),
                        "registrations": m.registrations,
                        "starts": list(m.starts),
                    }
                )
            return out


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"message": message, "errors": {}}, status_code=status)


async def _json_body(request: Request) -> dict[str, Any] | JSONResponse:
    try:
        body = json.loads(await request.body())
    except ValueError:
        return _error(400, "body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "body must be a JSON object")
    return body


def router(plane: ControlPlane) -> APIRouter:
    """The manifest routes (include them before any catch-all route)."""
    routes = APIRouter()
    base = "/api/v1/workspace/{workspace_id}/manifest"

    def workspace_or_404(workspace_id: str) -> JSONResponse | None:
        if workspace_id != plane.workspace_id:
            return _error(404, f"workspace {workspace_id} not found")
        return None

    @routes.post(base)
    async def register(workspace_id: str, request: Request) -> JSONResponse:
        if (missing := workspace_or_404(workspace_id)) is not None:
            return missing
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        try:
            return JSONResponse(plane.manifests.register(workspace_id, body))
        except ValueError as exc:
            return _error(400, str(exc))

    @routes.get(base + "/find")
    async def find(workspace_id: str, name: str) -> JSONResponse:
        try:
            return JSONResponse(plane.manifests.find(workspace_id, name))
        except NotFound as exc:
            return _error(404, str(exc))

    @routes.delete(base)
    async def unregister(workspace_id: str, name: str) -> Response:
        try:
            plane.manifests.unregister(workspace_id, name)
        except NotFound as exc:
            return _error(404, str(exc))
        return Response(status_code=200)

    @routes.post(base + "/start")
    async def start(workspace_id: str, request: Request) -> JSONResponse:
        if (missing := workspace_or_404(workspace_id)) is not None:
            return missing
        body = await _json_body(request)
        if isinstance(body, JSONResponse):
            return body
        name = str(body.get("name") or "")
        try:
            live = plane.manifests.live_cluster(workspace_id, name)
        except NotFound as exc:
            return _error(404, str(exc))
        if live is None and plane.take_fail_start():
            return _error(500, "fake: compute start failed")
        try:
            compute_id, started = plane.manifests.start(workspace_id, request.state.user_id, name)
        except NotFound as exc:  # unregistered meanwhile
            return _error(404, str(exc))
        if started:
            if plane.hang_start_answers_s:
                await asyncio.sleep(plane.hang_start_answers_s)
            if plane.take_lost_start():
                return _error(500, "fake: the start's answer was lost")
        return JSONResponse(plane.get_compute(workspace_id, compute_id))

    return routes
