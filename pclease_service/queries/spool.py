"""Plans waiting to run and collect results, kept in the deployment's storage (a
:class:`~pclease_service.blobs.BlobStore`: a directory, the database or S3) so that any
replica can run a plan another one accepted and serve a result another one produced.

A backend writes a collect result to a file (``result_path``); with remote storage that
file is on this machine's scratch directory until :meth:`Spool.keep_result` stores it.
Storage failures other than a missing blob are raised as
:class:`~pclease_service.errors.StorageUnavailable`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pclease_service.blobs import BlobNotFound, BlobStore, Readable
from pclease_service.errors import PcleaseError, StorageUnavailable

log = logging.getLogger("pclease.queries")

T = TypeVar("T")
_PLAN = ".plan"
_RESULT = ".arrow"


def _plan_key(query_id: str) -> str:
    return f"plans/{query_id}{_PLAN}"


def _result_key(query_id: str) -> str:
    return f"results/{query_id}{_RESULT}"


class Spool:
    """Every method blocks (run it in a thread)."""

    def __init__(self, blobs: BlobStore, scratch: Path) -> None:
        self.blobs = blobs
        self.scratch = scratch.resolve()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (BlobNotFound, PcleaseError):
            raise
        except Exception as exc:
            log.warning("%s in the %s storage failed: %r", what, self.blobs.kind, exc)
            raise StorageUnavailable(
                f"{what} in the {self.blobs.kind} storage of plans and results failed "
                f"({type(exc).__name__}); try again, and tell the operator if it persists"
            ) from None

    def prepare(self) -> None:
        self._call("preparing", self.blobs.prepare)
        self.result_path("probe").parent.mkdir(parents=True, exist_ok=True, mode=0o700)

    def write_plan(self, query_id: str, data: bytes) -> None:
        self._call("storing a plan", lambda: self.blobs.put(_plan_key(query_id), data))

    def read_plan(self, query_id: str) -> bytes:
        """Raises BlobNotFound if the plan is gone."""
        return self._call("reading a plan", lambda: self.blobs.read(_plan_key(query_id)))

    def discard_plan(self, query_id: str) -> None:
        self._call("deleting a plan", lambda: self.blobs.delete(_plan_key(query_id)))

    def result_path(self, query_id: str) -> Path:
        """Where a backend on this machine writes the result of ``query_id``."""
        in_place = self.blobs.local_path(_result_key(query_id))
        return in_place if in_place is not None else self.scratch / f"{query_id}{_RESULT}"

    def keep_result(self, query_id: str) -> None:
        """Store the result file the backend wrote (a no-op when it already is in place)."""
        path = self.result_path(query_id)
        self._call("storing a result", lambda: self.blobs.put_file(_result_key(query_id), path))

    def open_result(self, query_id: str) -> Readable:
        """The stored result as a stream; raises BlobNotFound if it is gone."""
        return self._call("reading a result", lambda: self.blobs.open(_result_key(query_id)))

    def discard_result(self, query_id: str) -> None:
        self.result_path(query_id).unlink(missing_ok=True)
        self._call("deleting a result", lambda: self.blobs.delete(_result_key(query_id)))

    def plan_ids(self) -> list[str]:
        keys = self._call("listing plans", lambda: self.blobs.keys("plans/"))
        return [k.removeprefix("plans/").removesuffix(_PLAN) for k in keys if k.endswith(_PLAN)]

    def result_ids(self) -> list[str]:
        keys = self._call("listing results", lambda: self.blobs.keys("results/"))
        return [
            k.removeprefix("results/").removesuffix(_RESULT) for k in keys if k.endswith(_RESULT)
        ]
