"""Replica rows (liveness) and the fleet's shutdown flag.

A replica is alive while its row is not ``stopped`` and its heartbeat is younger than the
service's ``replica_ttl_s``; whatever names a replica that is not alive (a claim, a hosted
context, a running query, a waiting ticket) may be taken over or failed by any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, delete, insert, select, update

from pclease_service.db.schema import fleet, replicas
from pclease_service.db.tx import Tx
from pclease_service.states import ReplicaState


@dataclass(frozen=True)
class ReplicaRecord:
    id: str
    host: str
    pid: int
    state: ReplicaState
    started_at: datetime
    heartbeat_at: datetime

    @classmethod
    def from_row(cls, row: Row[Any]) -> ReplicaRecord:
        m = dict(row._mapping)
        m["state"] = ReplicaState(m["state"])
        return cls(**m)


def register(tx: Tx, replica_id: str, *, host: str, pid: int) -> None:
    """This replica is serving from now on. An id may be reused by a later process (a
    restart with a configured ``replica_id``): the row starts afresh."""
    tx.conn.execute(delete(replicas).where(replicas.c.id == replica_id))
    tx.conn.execute(
        insert(replicas).values(
            id=replica_id,
            host=host,
            pid=pid,
            state=ReplicaState.SERVING.value,
            started_at=tx.now,
            heartbeat_at=tx.now,
        )
    )


def heartbeat(tx: Tx, replica_id: str) -> bool:
    """Refresh this replica's row; False if it has been marked stopped (then it must not
    act any more: another replica may already have taken its work over)."""
    result = tx.conn.execute(
        update(replicas)
        .where(replicas.c.id == replica_id, replicas.c.state != ReplicaState.STOPPED.value)
        .values(heartbeat_at=tx.now)
    )
    return bool(result.rowcount)


def set_state(tx: Tx, replica_id: str, state: ReplicaState) -> None:
    tx.conn.execute(
        update(replicas)
        .where(replicas.c.id == replica_id)
        .values(state=state.value, heartbeat_at=tx.now)
    )


def alive_condition(now: datetime, ttl_s: float) -> ColumnElement[bool]:
    return and_(
        replicas.c.state != ReplicaState.STOPPED.value,
        replicas.c.heartbeat_at >= now - timedelta(seconds=ttl_s),
    )


def alive_ids(tx: Tx, ttl_s: float) -> set[str]:
    return set(
        tx.conn.execute(select(replicas.c.id).where(alive_condition(tx.now, ttl_s))).scalars()
    )


def alive_subquery(now: datetime, ttl_s: float) -> Any:
    """``replica_column.in_(alive_subquery(...))``: usable inside one statement."""
    return select(replicas.c.id).where(alive_condition(now, ttl_s)).scalar_subquery()


def last_heartbeat(tx: Tx, replica_id: str) -> datetime | None:
    value: datetime | None = tx.conn.execute(
        select(replicas.c.heartbeat_at).where(replicas.c.id == replica_id)
    ).scalar()
    return value


def list_replicas(tx: Tx) -> list[ReplicaRecord]:
    rows = tx.conn.execute(select(replicas).order_by(replicas.c.started_at))
    return [ReplicaRecord.from_row(r) for r in rows]


def forget_dead(tx: Tx, *, older_than: datetime) -> int:
    """Delete rows of replicas that stopped or went silent before ``older_than``."""
    result = tx.conn.execute(delete(replicas).where(replicas.c.heartbeat_at < older_than))
    return int(result.rowcount or 0)


# -- the fleet ------------------------------------------------------------------------------


def shutdown_requested(tx: Tx) -> datetime | None:
    value: datetime | None = tx.conn.execute(
        select(fleet.c.shutdown_requested_at).where(fleet.c.id == 1)
    ).scalar()
    return value


def request_shutdown(tx: Tx, *, by: str) -> None:
    if tx.conn.execute(select(fleet.c.id).where(fleet.c.id == 1)).scalar() is None:
        tx.conn.execute(insert(fleet).values(id=1))
    tx.conn.execute(
        update(fleet)
        .where(fleet.c.id == 1, fleet.c.shutdown_requested_at.is_(None))
        .values(shutdown_requested_at=tx.now, shutdown_requested_by=by)
    )


def clear_shutdown(tx: Tx) -> None:
    tx.conn.execute(
        update(fleet)
        .where(fleet.c.id == 1)
        .values(shutdown_requested_at=None, shutdown_requested_by=None)
    )
