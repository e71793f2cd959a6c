"""Keys the replicas share (``service_keys``): made once, by whichever replica asks first."""

from __future__ import annotations

from sqlalchemy import Insert, select
from sqlalchemy.dialects import postgresql, sqlite

from pclease_service.db.schema import service_keys
from pclease_service.db.tx import Tx

#: The dashboard's session signing key.
DASHBOARD_SESSION = "dashboard_session"


def _insert_if_absent(tx: Tx, values: dict[str, object]) -> Insert:
    if tx.conn.dialect.name == "postgresql":
        return postgresql.insert(service_keys).values(values).on_conflict_do_nothing()
    return sqlite.insert(service_keys).values(values).on_conflict_do_nothing()


def shared_key(tx: Tx, name: str, candidate: str) -> str:
    """The value of key ``name``. If there is none yet, ``candidate`` becomes it; when two
    replicas race, the first insert wins and both read it back."""
    tx.conn.execute(_insert_if_absent(tx, {"name": name, "value": candidate, "created_at": tx.now}))
    value: str = tx.conn.execute(
        select(service_keys.c.value).where(service_keys.c.name == name)
    ).scalar_one()
    return value
