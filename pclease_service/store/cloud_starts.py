"""The Polars Cloud start ledger (``cloud_starts``): what this deployment asked Polars Cloud
to start, one row per context (see ``backends/polars_cloud/__init__.py``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import delete, insert, select

from pclease_service.db.schema import cloud_starts
from pclease_service.db.tx import Tx


def put_start(tx: Tx, values: Mapping[str, Any]) -> None:
    """Insert or replace the row of ``values["context_id"]``."""
    tx.conn.execute(delete(cloud_starts).where(cloud_starts.c.context_id == values["context_id"]))
    tx.conn.execute(insert(cloud_starts).values(**values))


def delete_start(tx: Tx, context_id: str, compute_id: str | None) -> int:
    """Delete the row of ``context_id`` if it still records ``compute_id`` (None: still
    pending); a row completed or replaced meanwhile stays. Returns the rows deleted."""
    compute = (
        cloud_starts.c.compute_id.is_(None)
        if compute_id is None
        else cloud_starts.c.compute_id == compute_id
    )
    result = tx.conn.execute(
        delete(cloud_starts).where(cloud_starts.c.context_id == context_id, compute)
    )
    return int(result.rowcount or 0)


def list_starts(tx: Tx) -> list[dict[str, Any]]:
    rows = tx.conn.execute(select(cloud_starts).order_by(cloud_starts.c.requested_at))
    return [dict(row._mapping) for row in rows]
