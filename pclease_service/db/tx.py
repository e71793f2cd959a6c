"""One unit of work: the transaction every store function takes and none commits."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Connection


@dataclass
class Tx:
    """A connection inside ``begin()``, its clock reading, and what it changed (so the
    async layer can wake waiters once the transaction has committed)."""

    conn: Connection
    now: datetime
    leases_changed: set[str] = field(default_factory=set)
    #: contexts whose state changed: the reconciler has something to do
    contexts_changed: set[str] = field(default_factory=set)
    profiles_freed: set[str] = field(default_factory=set)
    queries_changed: set[str] = field(default_factory=set)
    #: Written by the query runner itself: its changes do not wake it (it knows them).
    by_runner: bool = False
    #: Raised after the commit, for requests that must persist a change (say, expire a
    #: lease) and still fail.
    deferred_error: Exception | None = None
