"""API token rows: only a token's hash is stored, never the token."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, insert, select, update

from pclease_service.db.schema import tokens
from pclease_service.db.tx import Tx
from pclease_service.store.transitions import new_id


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    token_hash: str
    scopes: frozenset[str]
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: Row[Any]) -> TokenRecord:
        m = dict(row._mapping)
        m["scopes"] = frozenset(s for s in m["scopes"].split(",") if s)
        return cls(**m)


def insert_token(tx: Tx, *, name: str, token_hash: str, scopes: Iterable[str]) -> TokenRecord:
    row = tx.conn.execute(
        insert(tokens)
        .values(
            id=new_id(),
            name=name,
            token_hash=token_hash,
            scopes=",".join(sorted(scopes)),
            created_at=tx.now,
        )
        .returning(*tokens.c)
    ).one()
    return TokenRecord.from_row(row)


def token_by_hash(tx: Tx, token_hash: str) -> TokenRecord | None:
    row = tx.conn.execute(select(tokens).where(tokens.c.token_hash == token_hash)).one_or_none()
    return None if row is None else TokenRecord.from_row(row)


def token_by_id(tx: Tx, token_id: str) -> TokenRecord | None:
    row = tx.conn.execute(select(tokens).where(tokens.c.id == token_id)).one_or_none()
    return None if row is None else TokenRecord.from_row(row)


def token_by_name(tx: Tx, name: str) -> TokenRecord | None:
    row = tx.conn.execute(select(tokens).where(tokens.c.name == name)).one_or_none()
    return None if row is None else TokenRecord.from_row(row)


def list_tokens(tx: Tx) -> list[TokenRecord]:
    rows = tx.conn.execute(select(tokens).order_by(tokens.c.name))
    return [TokenRecord.from_row(r) for r in rows]


def revoke_token(tx: Tx, name: str) -> bool:
    result = tx.conn.execute(
        update(tokens)
        .where(tokens.c.name == name, tokens.c.revoked_at.is_(None))
        .values(revoked_at=tx.now)
    )
    return result.rowcount == 1


def token_names(tx: Tx, ids: Iterable[str]) -> dict[str, str]:
    wanted = list(set(ids))
    if not wanted:
        return {}
    rows = tx.conn.execute(select(tokens.c.id, tokens.c.name).where(tokens.c.id.in_(wanted)))
    return {r.id: r.name for r in rows}
