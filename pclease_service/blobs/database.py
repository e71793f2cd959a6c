"""Blobs as rows of the service database (``blobs``, SQL in ``store/blobs.py``): nothing
else to run or share, for plans and results of modest size. A blob is read back in chunks
(``substr`` in the database), so a download never holds it whole; it is written in one
statement, so it is held whole once, when stored."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from pclease_service.blobs.base import CHUNK_BYTES, BlobNotFound, BlobStore, Readable, check_key
from pclease_service.clock import Clock
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.errors import PayloadTooLarge
from pclease_service.store import blobs

T = TypeVar("T")


class DatabaseBlobs(BlobStore):
    kind = "database"

    def __init__(self, db: Database, clock: Clock, *, max_bytes: int) -> None:
        self.db = db
        self.clock = clock
        self.max_bytes = max_bytes

    def _run(self, fn: Callable[[Tx], T]) -> T:
        # Called in a worker thread (every BlobStore method blocks): one transaction each.
        with self.db.engine.begin() as conn:
            return fn(Tx(conn, self.clock.now()))

    def _check_size(self, size: int) -> None:
        if size > self.max_bytes:
            raise PayloadTooLarge(
                f"{size} bytes is more than storage.max_database_blob_bytes = "
                f"{self.max_bytes} allows; send a smaller plan, sink large results to files, "
                "or ask the operator to keep plans and results in s3 storage"
            )

    def put(self, key: str, data: bytes) -> None:
        check_key(key)
        self._check_size(len(data))
        self._run(lambda tx: blobs.put_blob(tx, key, data))

    def put_file(self, key: str, path: Path) -> None:
        try:
            self._check_size(path.stat().st_size)
            self.put(key, path.read_bytes())
        finally:
            path.unlink(missing_ok=True)

    def open(self, key: str) -> Readable:
        size = self._run(lambda tx: blobs.blob_size(tx, check_key(key)))
        if size is None:
            raise BlobNotFound(key)
        return Readable(size, self._chunks(key, size))

    def _chunks(self, key: str, size: int) -> Iterator[bytes]:
        for offset in range(0, size, CHUNK_BYTES):

            def read(tx: Tx, at: int = offset) -> bytes | None:
                return blobs.blob_chunk(tx, key, at, CHUNK_BYTES)

            chunk = self._run(read)
            if chunk is None:
                raise BlobNotFound(key)
            yield chunk

    def read(self, key: str) -> bytes:
        data = self._run(lambda tx: blobs.blob_data(tx, check_key(key)))
        if data is None:
            raise BlobNotFound(key)
        return data

    def delete(self, key: str) -> None:
        self._run(lambda tx: blobs.delete_blob(tx, check_key(key)))

    def keys(self, prefix: str) -> list[str]:
        return self._run(lambda tx: blobs.blob_keys(tx, prefix))
