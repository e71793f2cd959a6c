"""Who is calling: API tokens and the principal each one authenticates.

A token is made once, shown once and stored as a SHA-256 hash. Tokens are 256 random bits,
so a fast hash is enough: there is nothing to brute-force. A token provisioned from a
secret manager (``pclease token create --value-from-env``) must be as hard to guess, so
:func:`check_provided` asks for at least as many characters as a generated one has, in the
bearer-token alphabet of RFC 6750. :class:`Principals` turns a
token (API) or a token id (a dashboard session) into a :class:`Principal`, with one cache
for both.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pclease_service.clock import Clock
from pclease_service.db.session import Database
from pclease_service.store import tokens
from pclease_service.store.tokens import TokenRecord

SCOPES = frozenset({"lease", "read", "admin"})
PREFIX = "pcl_"
PROVIDED_MIN_CHARS = 32
PROVIDED_MAX_CHARS = 512
# A random value of 32+ characters has far more; "changeme" repeated has 7.
_PROVIDED_MIN_DISTINCT = 8
# RFC 6750's b64token: safe in an Authorization header, a JSON string and a connection URI
# password once URL-encoded.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
#: At most this many principals are cached; past it the cache starts over.
_CACHE_MAX = 10_000


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_provided(value: str) -> str:
    """A token value given by the operator, or ValueError saying what is wrong with it.
    The message never contains the value or any part of it."""
    if not PROVIDED_MIN_CHARS <= len(value) <= PROVIDED_MAX_CHARS:
        raise ValueError(
            f"the token value has {len(value)} characters; it needs "
            f"{PROVIDED_MIN_CHARS} to {PROVIDED_MAX_CHARS} (make one with `python -c "
            "'import secrets; print(secrets.token_urlsafe(32))'` or `openssl rand -hex 32`)"
        )
    if not _B64TOKEN.fullmatch(value):
        allowed = _B64TOKEN.pattern
        bad = next((i for i, ch in enumerate(value) if not re.fullmatch(allowed, ch)), None)
        where = f" (the first other character is at position {bad + 1})" if bad is not None else ""
        raise ValueError(
            "the token value may only contain letters, digits and - . _ ~ + /, optionally "
            f"followed by = padding{where}"
        )
    if len(set(value)) < _PROVIDED_MIN_DISTINCT:
        raise ValueError(
            f"the token value uses fewer than {_PROVIDED_MIN_DISTINCT} different characters, "
            "so it looks like a placeholder; use a random value"
        )
    return value


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
