"""Blob rows (``blobs``): plans and results when ``storage.kind = "database"``."""

from __future__ import annotations

from sqlalchemy import delete, func, insert, select

from pclease_service.db.schema import blobs
from pclease_service.db.tx import Tx


def put_blob(tx: Tx, key: str, data: bytes) -> None:
    tx.conn.execute(delete(blobs).where(blobs.c.key == key))
    tx.conn.execute(insert(blobs).values(key=key, data=data, size=len(data), created_at=tx.now))


def blob_size(tx: Tx, key: str) -> int | None:
    size = tx.conn.execute(select(blobs.c.size).where(blobs.c.key == key)).scalar()
    return None if size is None else int(size)


def blob_chunk(tx: Tx, key: str, offset: int, length: int) -> bytes | None:
    """``length`` bytes from ``offset`` (0-based), read by the database, not in Python."""
    chunk = tx.conn.execute(
        select(func.substr(blobs.c.data, offset + 1, length)).where(blobs.c.key == key)
    ).scalar()
    return None if chunk is None else bytes(chunk)


def blob_data(tx: Tx, key: str) -> bytes | None:
    data = tx.conn.execute(select(blobs.c.data).where(blobs.c.key == key)).scalar()
    return None if data is None else bytes(data)


def delete_blob(tx: Tx, key: str) -> None:
    tx.conn.execute(delete(blobs).where(blobs.c.key == key))


def blob_keys(tx: Tx, prefix: str) -> list[str]:
    rows = tx.conn.execute(
        select(blobs.c.key).where(blobs.c.key.startswith(prefix, autoescape=True))
    )
    return sorted(row[0] for row in rows)
