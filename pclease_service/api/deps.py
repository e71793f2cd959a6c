"""Dependencies shared by the routes: the service and the authenticated caller."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pclease_service import store, tokens
from pclease_service.errors import Forbidden, Unauthorized
from pclease_service.leases import Principal
from pclease_service.runtime import Service

_HOW_TO = "create one with `pclease token create NAME --scope lease`"


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


class TokenCache:
    """Verified tokens for a few seconds, so most requests skip a database read.
    A revoked token stops working within ``token_cache_s``."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, Principal | None]] = {}

    def get(self, token_hash: str) -> tuple[bool, Principal | None]:
        entry = self._entries.get(token_hash)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def put(self, token_hash: str, principal: Principal | None) -> None:
        if self.ttl_s <= 0:  # caching is off: a revoked token must fail at once
            return
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[token_hash] = (time.monotonic() + self.ttl_s, principal)


# Declares the scheme in the OpenAPI document (on every route that needs a token); the
# refusal is ours, with a message that says how to get a token.
_BEARER = HTTPBearer(
    scheme_name="token",
    description="An API token: `pclease token create NAME --scope lease|read|admin`.",
    auto_error=False,
)


async def get_principal(
    request: Request,
    service: ServiceDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)],
) -> Principal:
    value = credentials.credentials.strip() if credentials is not None else ""
    if not value:
        raise Unauthorized(f"send 'Authorization: Bearer <token>'; {_HOW_TO}")
    token_hash = tokens.hash_token(value)
    cache: TokenCache = request.app.state.token_cache
    hit, principal = cache.get(token_hash)
    if not hit:
        record = await service.db.read(lambda tx: store.token_by_hash(tx, token_hash))
        principal = None
        if record is not None and record.revoked_at is None:
            principal = Principal(record.id, record.name, record.scopes)
        cache.put(token_hash, principal)
    if principal is None:
        raise Unauthorized(f"this token is unknown or revoked; {_HOW_TO}")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_read(principal: PrincipalDep) -> Principal:
    """Any valid token may read; scope decides how much it sees (own leases or all)."""
    return principal


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this needs a token with the admin scope")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
