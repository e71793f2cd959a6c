"""What this deployment started on Polars Cloud: one small JSON file per context, no secrets.

polars-cloud 0.12.0's compute model does not return labels, so the backend cannot tell its
computes apart by listing them. An entry is written *before* the start request (compute id
still unknown) and completed when the start returns; see the package docstring for how a
pending entry may claim a compute whose start answer was lost (:func:`matches`).
"""

from __future__ import annotations

import builtins
import json
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pclease_service.backends.base import Handle
from pclease_service.backends.polars_cloud.client import COMPUTE_LIVE, Compute
from pclease_service.errors import BackendError

log = logging.getLogger("pclease.backends.polars_cloud")

# A compute's request_time may precede our clock's idea of when we asked by this much.
CLOCK_SKEW_S = 120.0


@dataclass(frozen=True)
class Entry:
    context_id: str
    workspace_id: str
    compute_id: str | None
    requested_at: float
    cpus: int | None
    memory_gb: float | None
    cluster_size: int

    def handle(self) -> dict[str, Any]:
        """The backend handle of a completed entry."""
        return {"workspace_id": self.workspace_id, "compute_id": self.compute_id}


class Ledger:
    """What this deployment started, one JSON file per context (see the module docstring)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def _path(self, context_id: str) -> Path:
        if not context_id or "/" in context_id or context_id.startswith("."):
            raise BackendError(f"context id {context_id!r} cannot name a ledger entry")
        return self.directory / f"{context_id}.json"

    def write(self, entry: Entry) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self._path(entry.context_id)
        tmp = path.with_name(path.name + ".tmp")
        with self._lock:
            tmp.write_text(json.dumps(entry.__dict__))
            tmp.replace(path)

    def forget(self, context_id: str) -> None:
        with self._lock:
            self._path(context_id).unlink(missing_ok=True)

    def entries(self) -> builtins.list[Entry]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(Entry(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                log.warning("ignoring unreadable ledger entry %s", path.name)
        return found


def matches(entry: Entry, compute: Compute, user_id: str) -> bool:
    """Whether ``compute`` could be what the start behind ``entry`` created. A shape Polars
    Cloud does not echo back (None) cannot rule a compute out."""
    ram_gb = math.ceil(entry.memory_gb) if entry.memory_gb is not None else None
    return (
        compute.user_id == user_id
        and compute.workspace_id == entry.workspace_id
        and compute.status in COMPUTE_LIVE
        and compute.request_time >= entry.requested_at - CLOCK_SKEW_S
        and (entry.cpus is None or compute.cpus in (None, entry.cpus))
        and (ram_gb is None or compute.ram_gb in (None, ram_gb))
        and compute.cluster_size == entry.cluster_size
    )


def handle_of(handle: Handle) -> tuple[str, str]:
    """(workspace id, compute id) of a backend handle."""
    try:
        return str(handle["workspace_id"]), str(handle["compute_id"])
    except (KeyError, TypeError) as exc:
        raise BackendError(f"not a polars_cloud backend handle: {dict(handle)!r}") from exc
