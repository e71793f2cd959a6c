"""Dependencies shared by the routes: the service, the authenticated caller, checked ids
and the free-form text parameters."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pclease_service.errors import (
    ContextNotFound,
    Forbidden,
    LeaseNotFound,
    QueryNotFound,
    Unauthorized,
)
from pclease_service.principals import Principal
from pclease_service.runtime import Service
from pclease_service.text import Text

_HOW_TO = "create one with `pclease token create NAME --scope lease`"


# Every dependency here is ``async def``: FastAPI runs a plain ``def`` dependency in its
# thread pool, a thread hop per dependency per request for what is a dictionary lookup.


async def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]

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
    principal = await service.principals.by_token(value)
    if principal is None:
        raise Unauthorized(f"this token is unknown or revoked; {_HOW_TO}")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise Forbidden("this needs a token with the admin scope")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]

# -- ids in paths -----------------------------------------------------------------------------

# Ids are UUID strings (store.transitions.new_id). Anything longer, or holding a NUL (which
# PostgreSQL refuses in text), cannot name a row, so it is "not found" without asking the
# database.
_ID_MAX = 36


def _could_exist(item_id: str) -> bool:
    return len(item_id) <= _ID_MAX and "\x00" not in item_id


def _shown(item_id: str) -> str:
    return item_id if len(item_id) <= _ID_MAX else item_id[:_ID_MAX] + "..."


async def _lease_id(lease_id: Annotated[str, Path()]) -> str:
    if not _could_exist(lease_id):
        raise LeaseNotFound(_shown(lease_id))
    return lease_id


async def _context_id(context_id: Annotated[str, Path()]) -> str:
    if not _could_exist(context_id):
        raise ContextNotFound(_shown(context_id))
    return context_id


async def _query_id(query_id: Annotated[str, Path()]) -> str:
    if not _could_exist(query_id):
        raise QueryNotFound(_shown(query_id))
    return query_id


LeaseId = Annotated[str, Depends(_lease_id)]
ContextId = Annotated[str, Depends(_context_id)]
QueryId = Annotated[str, Depends(_query_id)]

# -- free-form text in query parameters and headers ---------------------------------------
# The same rule as in bodies (pclease_service.text).
IdText = Annotated[str, Text(_ID_MAX)]
ProfileName = Annotated[str, Text(63)]
RequiredName = Annotated[str, Text(250, min_length=1)]
