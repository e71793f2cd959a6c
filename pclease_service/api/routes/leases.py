"""``/v1/leases``: acquire, read (long-poll), heartbeat, release."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Query, Response, status

from pclease_service.api.deps import IdText, LeaseId, PrincipalDep, RequiredName, ServiceDep
from pclease_service.api.schemas import LeaseList, LeaseOut, LeaseRequest, Name, errors
from pclease_service.states import LeaseState
from pclease_service.text import Text

router = APIRouter(prefix="/v1", tags=["leases"], responses=errors(401))

IdempotencyKey = Annotated[
    Annotated[str, Text(200, min_length=1)] | None,
    Header(
        alias="Idempotency-Key",
        description="Retries with the same key return the first lease instead of a second.",
    ),
]


@router.post(
    "/leases",
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": LeaseOut, "description": "An Idempotency-Key replay: the lease made first."},
        **errors(400, 403, 409, 413, 422, 429, 503),
    },
)
async def create_lease(
    body: LeaseRequest,
    service: ServiceDep,
    principal: PrincipalDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> LeaseOut:
    lease, created = await service.leases.acquire(
        principal,
        profile_name=body.profile,
        holder=body.holder.model_dump(exclude_none=True),
        ttl_s=body.ttl_s,
        wait_s=body.wait_s,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = status.HTTP_200_OK
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/v1/leases/{lease.id}"
    return LeaseOut.of(lease)


@router.get("/leases", responses=errors(422))
async def list_leases(
    service: ServiceDep,
    principal: PrincipalDep,
    state: Annotated[list[LeaseState] | None, Query()] = None,
    context_id: Annotated[IdText | None, Query()] = None,
    dag_id: Annotated[Name | None, Query()] = None,
    run_id: Annotated[Name | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> LeaseList:
    leases = await service.leases.list_leases(
        principal, context_id=context_id, states=state, dag_id=dag_id, run_id=run_id, limit=limit
    )
    return LeaseList(leases=[LeaseOut.of(lease) for lease in leases])


@router.get("/leases/{lease_id}", responses=errors(404, 422))
async def get_lease(
    lease_id: LeaseId,
    service: ServiceDep,
    principal: PrincipalDep,
    wait_s: Annotated[
        float, Query(ge=0, description="Long-poll: wait up to this long for a state change.")
    ] = 0.0,
    state: Annotated[
        LeaseState | None,
        Query(description="With wait_s: wait while the lease is in this state."),
    ] = None,
) -> LeaseOut:
    lease = await service.leases.get(principal, lease_id, wait_s=wait_s, while_state=state)
    return LeaseOut.of(lease)


@router.post("/leases/{lease_id}/heartbeat", responses=errors(403, 404, 410, 503))
async def heartbeat(lease_id: LeaseId, service: ServiceDep, principal: PrincipalDep) -> LeaseOut:
    return LeaseOut.of(await service.leases.heartbeat(principal, lease_id))


@router.delete("/leases/{lease_id}", responses=errors(403, 404, 503))
async def release(lease_id: LeaseId, service: ServiceDep, principal: PrincipalDep) -> LeaseOut:
    return LeaseOut.of(await service.leases.release(principal, lease_id))


@router.delete("/leases", responses=errors(403, 422, 503))
async def release_holder(
    service: ServiceDep,
    principal: PrincipalDep,
    dag_id: Annotated[RequiredName, Query()],
    run_id: Annotated[RequiredName, Query()],
    task_id: Annotated[RequiredName | None, Query()] = None,
    map_index: Annotated[
        int | None, Query(ge=-1, description="With task_id: only this mapped task instance.")
    ] = None,
) -> LeaseList:
    released = await service.leases.release_holder(
        principal, dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index
    )
    return LeaseList(leases=[LeaseOut.of(lease) for lease in released])
