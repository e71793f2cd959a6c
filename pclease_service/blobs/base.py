"""The interface every storage of plans and results provides.

A key is a relative path of ``[a-z0-9._-]`` segments joined by ``/`` (``plans/<id>``).
An implementation must provide:

``put(key, data)`` / ``put_file(key, path)``
    Store bytes, or the finished file at ``path`` (which the call may move away); an
    existing blob of that key is replaced. Readers never see a half-written blob.
``open(key) -> Readable``
    The blob as a stream: its size and an iterator of chunks, read as it is consumed
    (never the whole blob in memory). Raises :class:`BlobNotFound`.
``read(key) -> bytes``
    The whole blob (plans, which are parsed whole anyway). Raises :class:`BlobNotFound`.
``delete(key)``
    Idempotent: deleting a missing blob succeeds.
``keys(prefix) -> list[str]``
    Every key starting with ``prefix``.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

CHUNK_BYTES = 1024 * 1024
_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")


class BlobNotFound(FileNotFoundError):
    """No blob has that key (never stored, or deleted)."""


def check_key(key: str) -> str:
    if not _KEY.match(key) or len(key) > 200:
        raise ValueError(f"not a blob key: {key!r}")
    return key


@dataclass(frozen=True)
class Readable:
    """A stored blob being read: its size and its bytes, chunk by chunk."""

    size: int
    chunks: Iterator[bytes]

    def small(self, limit: int = CHUNK_BYTES) -> bytes | None:
        """The whole blob if it is at most ``limit`` bytes (read now, so call this where
        blocking is fine); None, and nothing read, for a larger one."""
        if self.size > limit:
            return None
        return b"".join(self.chunks)


class BlobStore(abc.ABC):
    kind: ClassVar[str]

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def open(self, key: str) -> Readable: ...

    def read(self, key: str) -> bytes:
        return b"".join(self.open(key).chunks)

    @abc.abstractmethod
    def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def keys(self, prefix: str) -> list[str]: ...

    def prepare(self) -> None:
        """Make sure the storage can be used (create a directory); called at startup."""
        return None

    def local_path(self, key: str) -> Path | None:
        """Where the blob lives on this machine's file system, if it does (so a backend
        running here may write it in place); None for remote storage."""
        return None
