"""The fake service's HTTP face: the v1 routes, from an ``httpx.Request`` to an
``httpx.Response`` with the service's JSON (the models' ``to_json``) and its error bodies.

Used as the handler of an ``httpx.MockTransport`` and behind the fake's loopback server.
It checks what a client could get wrong (the token, the route, parameter types) and
answers with the service's status and error code; it is not a validator of every rule.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, TypeVar

import httpx

from pclease_client.errors import (
    ApiError,
    BudgetExhausted,
    CapacityExhausted,
    InvalidInput,
    QuotaExceeded,
)
from pclease_client.models import Model
from pclease_client.states import ContextState, LeaseState
from pclease_client.testing.service import FakeService

E = TypeVar("E", bound=Enum)
Handler = Callable[[FakeService, httpx.Request, dict[str, str]], httpx.Response]


def handle(service: FakeService, request: httpx.Request) -> httpx.Response:
    """Answer ``request`` as the service would."""
    request.read()
    service.requests.append(f"{request.method} {request.url.raw_path.decode()}")
    if request.headers.get("authorization") != f"Bearer {service.token}":
        return _error(
            ApiError(401, "unauthorized", "this token is unknown or revoked (the fake's token)"),
            {"WWW-Authenticate": "Bearer"},
        )
    failure = service.take_failure()
    if failure is not None:
        return _error(failure)
    path = request.url.path
    allowed = []
    for method, pattern, handler in _ROUTES:
        found = pattern.fullmatch(path)
        if found is None:
            continue
        if method != request.method:
            allowed.append(method)
            continue
        try:
            return handler(service, request, found.groupdict())
        except ApiError as exc:
            return _error(exc)
    if allowed:
        return _error(
            ApiError(405, "method_not_allowed", f"{request.method} is not allowed on {path}"),
            {"Allow": ", ".join(allowed)},
        )
    return _error(ApiError(404, "not_found", f"no route {path}; the API is described at /docs"))


def _error(exc: ApiError, headers: dict[str, str] | None = None) -> httpx.Response:
    headers = dict(headers or {})
    body: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if isinstance(exc, CapacityExhausted | QuotaExceeded) and exc.retry_after_s is not None:
        headers["Retry-After"] = f"{exc.retry_after_s:g}"
    if isinstance(exc, QuotaExceeded | BudgetExhausted) and exc.quota is not None:
        body["quota"] = exc.quota.to_json()
    return httpx.Response(exc.status, json={"error": body}, headers=headers)


def _json(
    body: Model | Iterable[Model], key: str | None = None, status: int = 200
) -> httpx.Response:
    if key is None:
        assert isinstance(body, Model)
        return httpx.Response(status, json=body.to_json())
    assert not isinstance(body, Model)
    return httpx.Response(status, json={key: [item.to_json() for item in body]})


# -- reading a request -------------------------------------------------------------------


def _invalid(message: str) -> InvalidInput:
    return InvalidInput(422, "invalid_input", message)


def _number(request: httpx.Request, name: str, default: float) -> float:
    raw = request.url.params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(f"query {name}: must be a number") from None
    if value < 0:
        raise _invalid(f"query {name}: must be at least 0")
    return value


def _integer(request: httpx.Request, name: str) -> int | None:
    raw = request.url.params.get(name)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise _invalid(f"query {name}: must be an integer") from None


def _states(request: httpx.Request, enum: type[E]) -> list[E]:
    try:
        return [enum(value) for value in request.url.params.get_list("state")]
    except ValueError:
        allowed = ", ".join(str(member.value) for member in enum)
        raise _invalid(f"query state: must be one of {allowed}") from None


def _body(request: httpx.Request) -> dict[str, Any]:
    try:
        body = json.loads(request.content)
    except ValueError:
        raise _invalid("the body is not valid JSON; send a JSON object") from None
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object, sent with Content-Type: application/json")
    return body


def _multipart(request: httpx.Request) -> dict[str, bytes]:
    """The fields of a ``multipart/form-data`` body, byte for byte."""
    found = re.search(r"boundary=\"?([^\";]+)\"?", request.headers.get("content-type", ""))
    if found is None:
        raise _invalid("send the plan and the options as multipart/form-data")
    fields: dict[str, bytes] = {}
    for part in request.content.split(b"--" + found.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.partition(b"\r\n\r\n")
        name = re.search(rb'name="([^"]*)"', head)
        if name is not None:
            fields[name.group(1).decode()] = content.removesuffix(b"\r\n")
    return fields


# -- the routes --------------------------------------------------------------------------


def _profiles(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    return _json(service.profiles.values(), "profiles")


def _create_lease(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    body = _body(request)
    profile, holder = body.get("profile"), body.get("holder", {})
    if not isinstance(profile, str) or not profile:
        raise _invalid("body profile: a configured profile name is required")
    if not isinstance(holder, dict) or not all(
        isinstance(v, str | int | float) for v in holder.values()
    ):
        raise _invalid("body holder: must be an object of strings, numbers and booleans")
    for name in ("ttl_s", "wait_s"):
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _invalid(f"body {name}: must be a number")
    lease, created = service.create_lease(
        profile,
        holder,
        ttl_s=body.get("ttl_s"),
        wait_s=body.get("wait_s"),
        idempotency_key=request.headers.get("idempotency-key"),
    )
    response = _json(lease, status=201 if created else 200)
    response.headers["Location"] = f"/v1/leases/{lease.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _list_leases(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    params = request.url.params
    found = service.list_leases(
        states=_states(request, LeaseState),
        context_id=params.get("context_id"),
        dag_id=params.get("dag_id"),
        run_id=params.get("run_id"),
        limit=_integer(request, "limit") or 500,
    )
    return _json(found, "leases")


def _get_lease(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    states = _states(request, LeaseState)
    lease = service.get_lease(
        ids["lease"],
        wait_s=_number(request, "wait_s", 0.0),
        while_state=states[0] if states else None,
    )
    return _json(lease)


def _heartbeat(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    return _json(service.heartbeat(ids["lease"]))


def _release(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    return _json(service.release(ids["lease"]))


def _release_holder(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    params = request.url.params
    dag_id, run_id = params.get("dag_id"), params.get("run_id")
    if not dag_id or not run_id:
        raise _invalid("query dag_id and run_id: both are required")
    released = service.release_holder(
        dag_id, run_id, task_id=params.get("task_id"), map_index=_integer(request, "map_index")
    )
    return _json(released, "leases")


def _list_contexts(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    found = service.list_contexts(
        states=_states(request, ContextState),
        profile=request.url.params.get("profile"),
        limit=_integer(request, "limit") or 500,
    )
    return _json(found, "contexts")


def _get_context(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    return _json(service.context(ids["context"]))


def _stop_context(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    return _json(service.stop_context(ids["context"], actor="client"))


def _events(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    params = request.url.params
    found = service.list_events(
        context_id=params.get("context_id"),
        lease_id=params.get("lease_id"),
        after_id=_integer(request, "after_id"),
        limit=_integer(request, "limit") or 200,
    )
    return _json(found, "events")


def _submit(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    fields = _multipart(request)
    if "plan" not in fields or "options" not in fields:
        raise _invalid("send the form fields 'plan' (the plan's bytes) and 'options' (JSON)")
    try:
        options = json.loads(fields["options"])
    except ValueError:
        options = None
    if not isinstance(options, dict):
        raise _invalid("options must be a JSON object (the form field 'options')")
    query = service.submit(ids["lease"], fields["plan"], options)
    response = _json(query, status=202)
    response.headers["Location"] = f"/v1/queries/{query.id}"
    return response


def _lease_queries(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    service.lease(ids["lease"])
    return _json(service.queries(lease_id=ids["lease"]), "queries")


def _get_query(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    return _json(service.get_query(ids["query"], wait_s=_number(request, "wait_s", 0.0)))


def _cancel_query(
    service: FakeService, request: httpx.Request, ids: dict[str, str]
) -> httpx.Response:
    return _json(service.cancel_query(ids["query"]))


def _result(service: FakeService, request: httpx.Request, ids: dict[str, str]) -> httpx.Response:
    return httpx.Response(
        200,
        content=service.result(ids["query"]),
        headers={"Content-Type": "application/vnd.apache.arrow.file"},
    )


_ID = r"[^/]+"
_ROUTES: list[tuple[str, re.Pattern[str], Handler]] = [
    (method, re.compile(pattern), handler)
    for method, pattern, handler in [
        ("GET", "/v1/profiles", _profiles),
        ("POST", "/v1/leases", _create_lease),
        ("GET", "/v1/leases", _list_leases),
        ("DELETE", "/v1/leases", _release_holder),
        ("GET", f"/v1/leases/(?P<lease>{_ID})", _get_lease),
        ("DELETE", f"/v1/leases/(?P<lease>{_ID})", _release),
        ("POST", f"/v1/leases/(?P<lease>{_ID})/heartbeat", _heartbeat),
        ("POST", f"/v1/leases/(?P<lease>{_ID})/queries", _submit),
        ("GET", f"/v1/leases/(?P<lease>{_ID})/queries", _lease_queries),
        ("GET", "/v1/contexts", _list_contexts),
        ("GET", f"/v1/contexts/(?P<context>{_ID})", _get_context),
        ("POST", f"/v1/contexts/(?P<context>{_ID})/stop", _stop_context),
        ("GET", "/v1/events", _events),
        ("GET", f"/v1/queries/(?P<query>{_ID})", _get_query),
        ("POST", f"/v1/queries/(?P<query>{_ID})/cancel", _cancel_query),
        ("GET", f"/v1/queries/(?P<query>{_ID})/result", _result),
    ]
]
