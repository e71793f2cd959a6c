"""``/v1/contexts``: read contexts (any token), stop one (admin)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from pclease_service.api.deps import AdminDep, ContextId, NoNul, PrincipalDep, ServiceDep
from pclease_service.api.schemas import ContextList, ContextOut
from pclease_service.runtime import Service
from pclease_service.states import ContextState
from pclease_service.store.contexts import ContextRecord

router = APIRouter(prefix="/v1", tags=["contexts"])


def _out(service: Service, context: ContextRecord) -> ContextOut:
    return ContextOut.of(context, service.contexts.profile(context), service.clock.now())


@router.get("/contexts")
async def list_contexts(
    service: ServiceDep,
    _: PrincipalDep,
    state: Annotated[list[ContextState] | None, Query()] = None,
    profile: Annotated[str | None, Query(max_length=63), NoNul] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> ContextList:
    found = await service.contexts.list_contexts(states=state, profile=profile, limit=limit)
    return ContextList(contexts=[_out(service, c) for c in found])


@router.get("/contexts/{context_id}")
async def get_context(context_id: ContextId, service: ServiceDep, _: PrincipalDep) -> ContextOut:
    return _out(service, await service.contexts.get(context_id))


@router.post("/contexts/{context_id}/stop")
async def stop_context(context_id: ContextId, service: ServiceDep, admin: AdminDep) -> ContextOut:
    return _out(service, await service.contexts.force_stop(admin, context_id))
