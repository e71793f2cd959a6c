"""Who is calling: API tokens and the principal each one authenticates.

A token is made once, shown once and stored as a SHA-256 hash. Tokens are 256 random bits,
so a fast hash is enough: there is nothing to brute-force. :class:`Principals` turns a
token (API) or a token id (a dashboard session) into a :class:`Principal`, with one cache
for both.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pclease_service.clock import Clock
from pclease_service.db.session import Database
from pclease_service.store import tokens
from pclease_service.store.tokens import TokenRecord

SCOPES = frozenset({"lease", "read", "admin"})
PREFIX = "pcl_"
#: At most this many principals are cached; past it the cache starts over.
_CACHE_MAX = 10_000


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: one API token."""

    token_id: str
    name: str
    scopes: frozenset[str]

    @classmethod
    def of(cls, record: TokenRecord | None) -> Principal | None:
        """The token's principal; None for no token or a revoked one."""
        if record is None or record.revoked_at is not None:
            return None
        return cls(record.id, record.name, record.scopes)

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes

    @property
    def can_read_all(self) -> bool:
        return self.is_admin or "read" in self.scopes

    @property
    def can_lease(self) -> bool:
        return self.is_admin or "lease" in self.scopes

    @property
    def actor(self) -> str:
        return f"token:{self.name}"


class Principals:
    """Principals by token (API requests) or token id (dashboard sessions), each looked up
    at most every ``ttl_s``: a revoked token stops working within that time (0: at once)."""

    def __init__(self, db: Database, clock: Clock, ttl_s: float) -> None:
        self.db = db
        self.clock = clock
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def by_token(self, token: str) -> Principal | None:
        token_hash = hash_token(token)
        return await self._cached(
            f"hash:{token_hash}",
            lambda: self.db.read(lambda tx: tokens.token_by_hash(tx, token_hash)),
        )

    async def by_token_id(self, token_id: str) -> Principal | None:
        return await self._cached(
            f"id:{token_id}", lambda: self.db.read(lambda tx: tokens.token_by_id(tx, token_id))
        )

    async def _cached(
        self, key: str, load: Callable[[], Awaitable[TokenRecord | None]]
    ) -> Principal | None:
        entry = self._cache.get(key)
        if entry is not None and entry[0] > self.clock.monotonic():
            return entry[1]
        principal = Principal.of(await load())
        if self.ttl_s > 0:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[key] = (self.clock.monotonic() + self.ttl_s, principal)
        return principal
