"""What this deployment started on Polars Cloud: the start ledger's entries and the rules
that read them. No secrets.

polars-cloud 0.12.0's compute model does not return labels, so the backend cannot tell its
computes apart by listing them. An entry is written *before* the start request (compute id
still unknown) and completed when the start returns; see the package docstring for how a
pending entry may claim a compute whose start answer was lost (:func:`matches`). The
entries live in the service database (a :class:`~pclease_service.backends.base.StartLedger`
the service hands over); releases before it kept one JSON file per context under
``data_dir/polars_cloud/ledger/``, which :func:`legacy_entries` reads once to import them.
"""

from __future__ import annotations

import builtins
import json
import logging
import math
from pathlib import Path

from pclease_service.backends.base import Handle, StartEntry
from pclease_service.backends.polars_cloud.client import COMPUTE_LIVE, Compute
from pclease_service.errors import BackendError

log = logging.getLogger("pclease.backends.polars_cloud")

# A compute's request_time may precede our clock's idea of when we asked by this much.
CLOCK_SKEW_S = 120.0


Entry = StartEntry


def legacy_entries(directory: Path) -> builtins.list[tuple[Path, Entry]]:
    """The entries an earlier release kept as files in ``directory``, with their paths."""
    found = []
    for path in sorted(directory.glob("*.json")):
        try:
            found.append((path, Entry(**json.loads(path.read_text()))))
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
