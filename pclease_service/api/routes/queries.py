"""``/v1/leases/{id}/queries`` and ``/v1/queries``: submit, read (long-poll), cancel,
download a result."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile, status
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from pclease_service.api.deps import LeaseId, PrincipalDep, QueryId, ServiceDep
from pclease_service.api.schemas import (
    DISTRIBUTED_TAGS,
    QueryList,
    QueryOptions,
    QueryOut,
    errors,
)
from pclease_service.errors import InvalidInput
from pclease_service.queries.manager import QueryRequest
from pclease_service.text import message_of, shown

router = APIRouter(prefix="/v1", tags=["queries"], responses=errors(401))


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
            loc = list(error["loc"])
            if loc[:1] == ["distributed"] and loc[1:2] and loc[1] in DISTRIBUTED_TAGS:
                del loc[1]  # the branch of true/false-or-settings, not a field
            where = ".".join(shown(str(p)) for p in loc)
            message = message_of(error)
            if error["type"] == "extra_forbidden":
                message = "unknown option; remove it"
            problems.append(f"options.{where}: {message}" if where else f"options: {message}")
        raise InvalidInput("; ".join(problems)) from None


@router.post(
    "/leases/{lease_id}/queries",
    status_code=status.HTTP_202_ACCEPTED,
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
        distributed=parsed.distributed,
    )
    query = await service.queries.submit(principal, lease_id, data, request)
    response.headers["Location"] = f"/v1/queries/{query.id}"
    return QueryOut.of(query, service.clock.now())


@router.get("/leases/{lease_id}/queries", responses=errors(404))
async def list_lease_queries(
    lease_id: LeaseId, service: ServiceDep, principal: PrincipalDep
) -> QueryList:
    queries = await service.queries.list_for_lease(principal, lease_id)
    now = service.clock.now()
    return QueryList(queries=[QueryOut.of(q, now) for q in queries])


@router.get("/queries/{query_id}", responses=errors(404, 422))
async def get_query(
    query_id: QueryId,
    service: ServiceDep,
    principal: PrincipalDep,
    wait_s: Annotated[
        float, Query(ge=0, description="Long-poll: wait up to this long for it to finish.")
    ] = 0.0,
) -> QueryOut:
    query = await service.queries.get(principal, query_id, wait_s=wait_s)
    return QueryOut.of(query, service.clock.now())


@router.post("/queries/{query_id}/cancel", responses=errors(403, 404, 503))
async def cancel_query(query_id: QueryId, service: ServiceDep, principal: PrincipalDep) -> QueryOut:
    return QueryOut.of(await service.queries.cancel(principal, query_id), service.clock.now())


@router.get(
    "/queries/{query_id}/result",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/vnd.apache.arrow.file": {}}},
        **errors(404, 409),
    },
)
async def query_result(query_id: QueryId, service: ServiceDep, principal: PrincipalDep) -> Response:
    """A collect query's result as an Arrow IPC file (``pl.read_ipc``)."""
    result = await service.queries.result(principal, query_id)
    media_type = "application/vnd.apache.arrow.file"
    disposition = {"Content-Disposition": f'attachment; filename="{query_id}.arrow"'}
    if isinstance(result, bytes):
        return Response(result, media_type=media_type, headers=disposition)
    return StreamingResponse(
        result.chunks,
        media_type=media_type,
        headers={"Content-Length": str(result.size), **disposition},
    )
