"""Dependencies shared by the routes: the service, the authenticated caller, checked ids."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request
from pydantic import AfterValidator

from pclease_service.errors import (
    ContextNotFound,
    Forbidden,
    LeaseNotFound,
    QueryNotFound,
    Unauthorized,
)
from pclease_service.principals import Principal
from pclease_service.runtime import Service

_HOW_TO = "create one with `pclease token create NAME --scope lease`"


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


async def get_principal(request: Request, service: ServiceDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized(f"send 'Authorization: Bearer <token>'; {_HOW_TO}")
    principal = await service.principals.by_token(value.strip())
    if principal is None:
        raise Unauthorized(f"this token is unknown or revoked; {_HOW_TO}")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
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


def _lease_id(lease_id: Annotated[str, Path()]) -> str:
    if not _could_exist(lease_id):
        raise LeaseNotFound(_shown(lease_id))
    return lease_id


def _context_id(context_id: Annotated[str, Path()]) -> str:
    if not _could_exist(context_id):
        raise ContextNotFound(_shown(context_id))
    return context_id


def _query_id(query_id: Annotated[str, Path()]) -> str:
    if not _could_exist(query_id):
        raise QueryNotFound(_shown(query_id))
    return query_id


LeaseId = Annotated[str, Depends(_lease_id)]
ContextId = Annotated[str, Depends(_context_id)]
QueryId = Annotated[str, Depends(_query_id)]


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain NUL (\\x00) characters")
    return value


NoNul = AfterValidator(_no_nul)
