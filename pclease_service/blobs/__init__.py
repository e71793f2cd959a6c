"""Where query plans and results are kept, so that every replica reads the same ones.

::

    base.py      the interface (BlobStore) and BlobNotFound
    local.py     a directory (the default: data_dir/spool; one replica, or a shared mount)
    database.py  rows of the service database (small blobs; nothing else to run)
    s3.py        an S3-compatible bucket, through boto3

:func:`create_blob_store` builds the one ``storage`` names. Every method blocks: callers
run them in threads.
"""

from __future__ import annotations

from pclease_service.blobs.base import BlobNotFound, BlobStore, Readable
from pclease_service.clock import Clock
from pclease_service.config import Settings, StorageKind
from pclease_service.db.session import Database

__all__ = ["BlobNotFound", "BlobStore", "Readable", "create_blob_store"]


def create_blob_store(settings: Settings, db: Database, clock: Clock) -> BlobStore:
    storage = settings.storage
    if storage.kind is StorageKind.DATABASE:
        from pclease_service.blobs.database import DatabaseBlobs

        return DatabaseBlobs(db, clock, max_bytes=storage.max_database_blob_bytes)
    if storage.kind is StorageKind.S3:
        from pclease_service.blobs.s3 import S3Blobs

        assert storage.url is not None
        return S3Blobs(storage.url, endpoint_url=storage.endpoint_url, region=storage.region)
    from pclease_service.blobs.local import LocalBlobs

    return LocalBlobs(storage.directory or settings.data_dir / "spool")
