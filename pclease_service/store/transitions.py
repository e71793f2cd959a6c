"""The guarded transition every state change goes through, and new row ids.

A transition is one ``UPDATE ... WHERE id = :id AND state = :seen [AND ...] RETURNING``
whose row count is checked, built from the transition tables in :mod:`pclease_service.states`,
and recorded as an event with its actor and reason: two actors can never both apply one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, select, update

from pclease_service.db.tx import Tx
from pclease_service.store.events import record_event

_KINDS = {"contexts": "context", "leases": "lease", "queries": "query"}


def new_id() -> str:
    return str(uuid.uuid4())


def guarded_transition(
    tx: Tx,
    table: Table,
    row_id: str,
    allowed: Iterable[StrEnum],
    to: StrEnum,
    *,
    actor: str,
    reason: str,
    only_from: Iterable[StrEnum] | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    values: Mapping[str, Any] | None = None,
) -> Row[Any] | None:
    """Move one row to ``to`` if it is in one of the ``allowed`` source states (narrowed to
    ``only_from``) and ``where`` holds.

    Returns the updated row, or None when the row does not exist, is in another state, or
    lost a race to a concurrent actor (the guarded UPDATE matched nothing).
    """
    sources = {s.value for s in allowed}
    if only_from is not None:
        sources &= {s.value for s in only_from}
    kind = _KINDS[table.name]
    for _ in range(3):
        seen = tx.conn.execute(select(table.c.state).where(table.c.id == row_id)).scalar()
        if seen is None or seen not in sources:
            return None
        stmt = (
            update(table)
            .where(table.c.id == row_id, table.c.state == seen, *where)
            .values(state=to.value, **(values or {}))
            .returning(*table.c)
        )
        row = tx.conn.execute(stmt).one_or_none()
        if row is None:
            # Either ``where`` does not hold or another actor moved the row in between;
            # look again so the caller sees the state that won.
            if tx.conn.execute(select(table.c.state).where(table.c.id == row_id)).scalar() == seen:
                return None
            continue
        m = row._mapping
        record_event(
            tx,
            kind=kind,
            actor=actor,
            reason=reason,
            context_id=row_id if kind == "context" else m["context_id"],
            lease_id=row_id if kind == "lease" else m.get("lease_id"),
            query_id=row_id if kind == "query" else None,
            from_state=seen,
            to_state=to.value,
        )
        if kind == "lease":
            tx.leases_changed.add(row_id)
        elif kind == "query":
            tx.queries_changed.add(row_id)
        else:
            tx.contexts_changed.add(row_id)
        return row
    return None
