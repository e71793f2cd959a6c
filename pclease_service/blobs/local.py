"""Blobs as files under one directory (mode 0700, files 0600)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from pclease_service.blobs.base import CHUNK_BYTES, BlobNotFound, BlobStore, Readable, check_key


def _chunks(f: BinaryIO) -> Iterator[bytes]:
    with f:
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


class LocalBlobs(BlobStore):
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def prepare(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def local_path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _staging(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")

    def put(self, key: str, data: bytes) -> None:
        path = self.local_path(key)
        tmp = self._staging(path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        tmp.replace(path)

    def put_file(self, key: str, path: Path) -> None:
        target = self.local_path(key)
        if path.resolve() == target:
            return
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(path, target)

    def open(self, key: str) -> Readable:
        try:
            f = self.local_path(key).open("rb")
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        return Readable(os.fstat(f.fileno()).st_size, _chunks(f))

    def read(self, key: str) -> bytes:
        try:
            return self.local_path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def delete(self, key: str) -> None:
        self.local_path(key).unlink(missing_ok=True)

    def keys(self, prefix: str) -> list[str]:
        folder, _, _ = prefix.rpartition("/")
        base = self.root / folder if folder else self.root
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)
