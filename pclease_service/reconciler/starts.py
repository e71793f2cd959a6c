"""The start ledger the service hands to backends that record a start before making it
(:class:`~pclease_service.backends.base.StartLedger`), kept in the database so that every
replica sees every start: a start whose answer was lost is resolved by whichever replica
looks next, and no replica takes another's computes for unknown ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from pclease_service.backends.base import StartEntry
from pclease_service.clock import Clock
from pclease_service.db.session import Database
from pclease_service.db.tx import Tx
from pclease_service.store import cloud_starts

T = TypeVar("T")

_FIELDS = (
    "context_id",
    "workspace_id",
    "compute_id",
    "requested_at",
    "answer_due_at",
    "cpus",
    "memory_gb",
    "cluster_size",
    "fence",
    "replica",
)


class DatabaseStartLedger:
    """A :class:`~pclease_service.backends.base.StartLedger` on ``cloud_starts``. Its
    methods block (the backend calls them in threads), one transaction each."""

    def __init__(self, db: Database, clock: Clock, *, replica: str | None = None) -> None:
        self.db = db
        self.clock = clock
        #: Stamped on the entries this replica writes (for people reading the table).
        self.replica = replica

    def _run(self, fn: Callable[[Tx], T]) -> T:
        with self.db.engine.begin() as conn:
            return fn(Tx(conn, self.clock.now()))

    def write(self, entry: StartEntry) -> None:
        values = {name: getattr(entry, name) for name in _FIELDS}
        values["replica"] = entry.replica or self.replica
        self._run(lambda tx: cloud_starts.put_start(tx, values))

    def forget(self, entry: StartEntry) -> None:
        self._run(lambda tx: cloud_starts.delete_start(tx, entry.context_id, entry.compute_id))

    def entries(self) -> list[StartEntry]:
        rows = self._run(cloud_starts.list_starts)
        return [
            StartEntry(**{name: row[name] for name in _FIELDS} | {"fence": row["fence"] or 0})
            for row in rows
        ]
