"""``/v1/events``: the event log (a lease-only token sees its own leases' history)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from pclease_service.api.deps import IdText, PrincipalDep, ServiceDep
from pclease_service.api.schemas import EventList, EventOut, errors

router = APIRouter(prefix="/v1", tags=["events"], responses=errors(401))

# events.id is a BIGINT; a larger bound would make PostgreSQL fail the query.
_EVENT_ID_MAX = 2**63 - 1


@router.get("/events", responses=errors(403, 404, 422))
async def list_events(
    service: ServiceDep,
    principal: PrincipalDep,
    context_id: Annotated[IdText | None, Query()] = None,
    lease_id: Annotated[IdText | None, Query()] = None,
    after_id: Annotated[int | None, Query(ge=0, le=_EVENT_ID_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> EventList:
    events = await service.history.events(
        principal, context_id=context_id, lease_id=lease_id, after_id=after_id, limit=limit
    )
    return EventList(events=[EventOut.of(e) for e in events])
