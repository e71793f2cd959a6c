"""Every SQL statement the service issues, split by aggregate.

::

    transitions.py  the guarded transition (UPDATE ... WHERE state = :seen RETURNING, row
                    count checked, event recorded) and new row ids
    events.py       the event log
    profiles.py     profile rows and the lock that serialises context allocation
    contexts.py     context rows: slots (refcounts), lifecycle transitions, the idle-stop
                    fence (begin_idle_stop), backend handles
    leases.py       lease rows: insertion, heartbeats, expiry, ending (gives the slot back)
    queries.py      query rows: submission, runner transitions, cancellation
    tokens.py       API token rows (hashes only)
    usage.py        what each token holds and started: the rows its quotas count, and the
                    token lock that serialises its grants
    reads.py        the read model the dashboard and /metrics share

Functions take a :class:`~pclease_service.db.tx.Tx` and never commit: the caller owns the
transaction (one per request or reconciler step, through
:class:`~pclease_service.db.session.Database`). Refcounts change in SQL, never
read-modify-write in Python. Callers write ``store.leases.end_lease(tx, ...)``.
"""

from pclease_service.store import (
    contexts,
    events,
    leases,
    profiles,
    queries,
    reads,
    tokens,
    transitions,
    usage,
)

__all__ = [
    "contexts",
    "events",
    "leases",
    "profiles",
    "queries",
    "reads",
    "tokens",
    "transitions",
    "usage",
]
