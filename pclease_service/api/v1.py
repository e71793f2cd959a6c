"""Routes of the v1 API. Thin: validate, call the lease manager, shape the answer."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    Header,
    Path,
    Query,
    Response,
    UploadFile,
    status,
)
from fastapi.responses import FileResponse
from pydantic import ValidationError

from pclease_service import store
from pclease_service.api.deps import AdminDep, PrincipalDep, ServiceDep
from pclease_service.api.schemas import (
    ContextList,
    ContextOut,
    EventList,
    EventOut,
    LeaseList,
    LeaseOut,
    LeaseRequest,
    Name,
    ProfileList,
    ProfileOut,
    QueryList,
    QueryOptions,
    QueryOut,
    errors,
)
from pclease_service.errors import (
    ContextNotFound,
    Forbidden,
    InvalidInput,
    LeaseNotFound,
    QueryNotFound,
)
from pclease_service.leases import force_stop_context
from pclease_service.queries import QueryRequest
from pclease_service.states import ContextState, LeaseState
from pclease_service.text import Text, message_of, shown

router = APIRouter(prefix="/v1", responses=errors(401))

# Ids are UUID strings (store.new_id). Anything longer, or holding a NUL (which PostgreSQL
# refuses in text), cannot name a row, so it is "not found" without asking the database.
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


# Free-form text in query parameters and headers follows the same rule as in bodies.
IdText = Annotated[str, Text(_ID_MAX)]
ProfileName = Annotated[str, Text(63)]
RequiredName = Annotated[str, Text(250, min_length=1)]

# events.id is a BIGINT; a larger bound would make PostgreSQL fail the query.
_EVENT_ID_MAX = 2**63 - 1

IdempotencyKey = Annotated[
    Annotated[str, Text(200, min_length=1)] | None,
    Header(
        alias="Idempotency-Key",
        description="Retries with the same key return the first lease instead of a second.",
    ),
]


@router.get("/profiles", tags=["profiles"])
async def list_profiles(service: ServiceDep, _: PrincipalDep) -> ProfileList:
    return ProfileList(profiles=[ProfileOut.of(p) for p in service.settings.profiles.values()])


@router.post(
    "/leases",
    status_code=status.HTTP_201_CREATED,
    tags=["leases"],
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


@router.get("/leases", tags=["leases"], responses=errors(422))
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


@router.get("/leases/{lease_id}", tags=["leases"], responses=errors(404, 422))
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


@router.post("/leases/{lease_id}/heartbeat", tags=["leases"], responses=errors(403, 404, 410, 503))
async def heartbeat(lease_id: LeaseId, service: ServiceDep, principal: PrincipalDep) -> LeaseOut:
    return LeaseOut.of(await service.leases.heartbeat(principal, lease_id))


@router.delete("/leases/{lease_id}", tags=["leases"], responses=errors(403, 404, 503))
async def release(lease_id: LeaseId, service: ServiceDep, principal: PrincipalDep) -> LeaseOut:
    return LeaseOut.of(await service.leases.release(principal, lease_id))


@router.delete("/leases", tags=["leases"], responses=errors(403, 422, 503))
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


@router.get("/contexts", tags=["contexts"], responses=errors(422))
async def list_contexts(
    service: ServiceDep,
    _: PrincipalDep,
    state: Annotated[list[ContextState] | None, Query()] = None,
    profile: Annotated[ProfileName | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> ContextList:
    contexts = await service.db.read(
        lambda tx: store.list_contexts(tx, states=state, profile=profile, limit=limit)
    )
    now = service.clock.now()
    return ContextList(
        contexts=[ContextOut.of(c, service.settings.profiles.get(c.profile), now) for c in contexts]
    )


@router.get("/contexts/{context_id}", tags=["contexts"], responses=errors(404))
async def get_context(context_id: ContextId, service: ServiceDep, _: PrincipalDep) -> ContextOut:
    context = await service.db.read(lambda tx: store.get_context(tx, context_id))
    if context is None:
        raise ContextNotFound(context_id)
    return ContextOut.of(
        context, service.settings.profiles.get(context.profile), service.clock.now()
    )


@router.post("/contexts/{context_id}/stop", tags=["contexts"], responses=errors(403, 404, 409, 503))
async def stop_context(context_id: ContextId, service: ServiceDep, admin: AdminDep) -> ContextOut:
    context = await force_stop_context(service.db, service.notifier, admin, context_id)
    return ContextOut.of(
        context, service.settings.profiles.get(context.profile), service.clock.now()
    )


@router.get("/events", tags=["events"], responses=errors(403, 404, 422))
async def list_events(
    service: ServiceDep,
    principal: PrincipalDep,
    context_id: Annotated[IdText | None, Query()] = None,
    lease_id: Annotated[IdText | None, Query()] = None,
    after_id: Annotated[int | None, Query(ge=0, le=_EVENT_ID_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 200,
) -> EventList:
    if not principal.can_read_all:
        # A lease-only token sees the history of its own leases and nothing else.
        if lease_id is None:
            raise Forbidden("reading all events needs the read scope; pass lease_id=<your lease>")
        lease = await service.db.read(lambda tx: store.get_lease(tx, lease_id))
        if lease is None or lease.token_id != principal.token_id:
            raise LeaseNotFound(lease_id)
    events = await service.db.read(
        lambda tx: store.list_events(
            tx, context_id=context_id, lease_id=lease_id, after_id=after_id, limit=limit
        )
    )
    return EventList(events=[EventOut.of(e) for e in events])


# -- queries -------------------------------------------------------------------------------


def _parse_options(raw: str) -> QueryOptions:
    try:
        data = json.loads(raw)
    except ValueError:
        raise InvalidInput("options must be a JSON object (the form field 'options')") from None
    if not isinstance(data, dict):
        raise InvalidInput("options must be a JSON object (the form field 'options')")
    try:
        return QueryOptions.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(shown(str(p)) for p in error["loc"])
            message = message_of(error)
            if error["type"] == "extra_forbidden":
                message = "unknown option; remove it"
            problems.append(f"options.{where}: {message}" if where else f"options: {message}")
        raise InvalidInput("; ".join(problems)) from None


@router.post(
    "/leases/{lease_id}/queries",
    status_code=status.HTTP_202_ACCEPTED,
    tags=["queries"],
    responses=errors(400, 403, 404, 410, 413, 422, 503),
)
async def submit_query(
    lease_id: LeaseId,
    service: ServiceDep,
    principal: PrincipalDep,
    response: Response,
    plan: Annotated[UploadFile, File(description="Polars' serialized plan, sink attached.")],
    options: Annotated[
        str,
        Form(
            max_length=16384,
            description="The QueryOptions schema, as a JSON object.",
            examples=['{"target": "collect", "polars_version": "2.0.0"}'],
        ),
    ],
) -> QueryOut:
    """Run a plan on the lease's context. Answers at once; follow the query's state."""
    parsed = _parse_options(options)
    data = await plan.read()
    engine = "streaming" if parsed.streaming else parsed.engine
    request = QueryRequest(
        target=parsed.target,
        destination=parsed.destination or None,
        engine=engine,
        labels=parsed.labels,
        polars_version=parsed.polars_version,
        timeout_s=float(parsed.timeout_s) if parsed.timeout_s is not None else None,
    )
    query = await service.queries.submit(principal, lease_id, data, request)
    response.headers["Location"] = f"/v1/queries/{query.id}"
    return QueryOut.of(query)


@router.get("/leases/{lease_id}/queries", tags=["queries"], responses=errors(404))
async def list_lease_queries(
    lease_id: LeaseId, service: ServiceDep, principal: PrincipalDep
) -> QueryList:
    queries = await service.queries.list_for_lease(principal, lease_id)
    return QueryList(queries=[QueryOut.of(q) for q in queries])


@router.get("/queries/{query_id}", tags=["queries"], responses=errors(404, 422))
async def get_query(
    query_id: QueryId,
    service: ServiceDep,
    principal: PrincipalDep,
    wait_s: Annotated[
        float, Query(ge=0, description="Long-poll: wait up to this long for it to finish.")
    ] = 0.0,
) -> QueryOut:
    return QueryOut.of(await service.queries.get(principal, query_id, wait_s=wait_s))


@router.post("/queries/{query_id}/cancel", tags=["queries"], responses=errors(403, 404, 503))
async def cancel_query(query_id: QueryId, service: ServiceDep, principal: PrincipalDep) -> QueryOut:
    return QueryOut.of(await service.queries.cancel(principal, query_id))


@router.get(
    "/queries/{query_id}/result",
    tags=["queries"],
    response_class=FileResponse,
    responses={
        200: {"content": {"application/vnd.apache.arrow.file": {}}},
        **errors(404, 409),
    },
)
async def query_result(
    query_id: QueryId, service: ServiceDep, principal: PrincipalDep
) -> FileResponse:
    """A collect query's result as an Arrow IPC file (``pl.read_ipc``)."""
    path = await service.queries.result_file(principal, query_id)
    return FileResponse(
        path,
        media_type="application/vnd.apache.arrow.file",
        filename=f"{query_id}.arrow",
    )
