"""``/v1/contexts``: read contexts (any token), stop one (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from pclease_service.api.deps import AdminDep, ContextId, PrincipalDep, ProfileName, ServiceDep
from pclease_service.api.schemas import ContextList, ContextOut, errors
from pclease_service.runtime import Service
from pclease_service.states import ContextState
from pclease_service.store.contexts import ContextRecord

router = APIRouter(prefix="/v1", tags=["contexts"], responses=errors(401))


def _out(service: Service, context: ContextRecord) -> ContextOut:
    return ContextOut.of(context, service.contexts.profile(context), service.clock.now())


@router.get("/contexts", responses=errors(422))
async def list_contexts(
    service: ServiceDep,
    _: PrincipalDep,
    state: Annotated[list[ContextState] | None, Query()] = None,
    profile: Annotated[ProfileName | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> ContextList:
    found = await service.contexts.list_contexts(states=state, profile=profile, limit=limit)
    return ContextList(contexts=[_out(service, c) for c in found])


@router.get("/contexts/{context_id}", responses=errors(404))
async def get_context(context_id: ContextId, service: ServiceDep, _: PrincipalDep) -> ContextOut:
    return _out(service, await service.contexts.get(context_id))


@router.post("/contexts/{context_id}/stop", responses=errors(403, 404, 409, 503))
async def stop_context(context_id: ContextId, service: ServiceDep, admin: AdminDep) -> ContextOut:
    return _out(service, await service.contexts.force_stop(admin, context_id))
