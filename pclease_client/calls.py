"""Every request the client makes, as data: one function per route of the v1 API.

A :class:`Call` says what to send (method, path, query, body, headers), whether it may be
sent again after a failure (:class:`Retry`), and how its answer is read. Building one does
no I/O: :class:`~pclease_client.client.PcleaseClient` sends calls with ``httpx.Client``,
and an asynchronous client can send the very same calls with ``httpx.AsyncClient``;
:class:`RetryPolicy` says, for both, when and after how long to try again.

Paths are built here and nowhere else on the client side (the Airflow provider included).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx

from pclease_client.errors import (
    PcleaseClientError,
    UnexpectedResponse,
    api_error,
)
from pclease_client.models import (
    ContextInfo,
    EventInfo,
    LeaseInfo,
    Model,
    ProfileInfo,
    QueryInfo,
    read_list,
)
from pclease_client.plans import Submission
from pclease_client.states import ContextState, LeaseState

T = TypeVar("T")
M = TypeVar("M", bound=Model)
Params = tuple[tuple[str, str | int | float], ...]

#: Answers worth another try: the service (or a proxy in front of it) is briefly away.
RETRY_STATUSES = frozenset({502, 503, 504})


class Retry(Enum):
    """Which failures a call may be sent again after."""

    #: Safe to repeat (a read, a release, a heartbeat, or a lease carrying an
    #: ``Idempotency-Key``): retried after a lost connection, a timeout or 502/503/504.
    ALWAYS = "always"
    #: Not safe to repeat (a query submission): retried only when the connection could
    #: not be made, so the service never saw it.
    UNSENT = "unsent"


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    params: Params = ()
    json: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: A multipart body: (file fields, form fields).
    multipart: tuple[Mapping[str, Any], Mapping[str, str]] | None = None
    retry: Retry = Retry.ALWAYS

    def url(self, base_url: str) -> str:
        """The full URL on a service at ``base_url`` (query parameters included)."""
        url = httpx.URL(base_url.rstrip("/") + self.path)
        return str(url.copy_merge_params(list(self.params))) if self.params else str(url)

    def request_args(self) -> dict[str, Any]:
        """The keyword arguments of ``httpx.Client.request`` (or ``AsyncClient``'s) after
        the method and the path."""
        args: dict[str, Any] = {}
        if self.params:
            args["params"] = list(self.params)
        if self.json is not None:
            args["json"] = dict(self.json)
        if self.headers:
            args["headers"] = dict(self.headers)
        if self.multipart is not None:
            args["files"], args["data"] = dict(self.multipart[0]), dict(self.multipart[1])
        return args

    def answer(self, response: httpx.Response) -> T:
        """What the call returns for ``response`` (read in full); raises the
        :mod:`~pclease_client.errors` class of an error answer."""
        if not response.is_success:
            raise error_of(response)
        try:
            return self.read(response)
        except PcleaseClientError:
            raise
        except ValueError as exc:  # not JSON, or not the shape this client knows
            raise UnexpectedResponse(response.status_code, str(exc)) from None


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and after how long, a failed call is sent again: up to ``retries``
    more times, waiting ``backoff_s``, then twice as long each time."""

    retries: int = 4
    backoff_s: float = 0.5

    def delay_s(
        self,
        call: Call[Any],
        attempt: int,
        *,
        status: int | None = None,
        error: Exception | None = None,
        draining: bool = False,
    ) -> float | None:
        """How long to wait before sending ``call`` again after its ``attempt``-th try
        (from 1) answered ``status`` or failed with ``error``; None: do not retry.
        ``draining``: the answer was 503 ``draining`` (a replica shutting down refused the
        request unread), so even a call that must not be repeated is sent again."""
        if attempt > self.retries:
            return None
        if draining:
            return float(self.backoff_s * 2 ** (attempt - 1))
        if error is not None:
            unsent = isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
            if not unsent and (call.retry is Retry.UNSENT or not _transient(error)):
                return None
        elif status not in RETRY_STATUSES or call.retry is Retry.UNSENT:
            return None
        return float(self.backoff_s * 2 ** (attempt - 1))


def is_draining(response: httpx.Response) -> bool:
    """Whether ``response`` is a replica's 503 ``draining``: the request was not handled."""
    if response.status_code != 503:
        return False
    try:
        body = response.json()
    except ValueError:
        return False
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and error.get("code") == "draining"


def _transient(error: Exception) -> bool:
    return isinstance(error, httpx.TransportError) and not isinstance(
        error, httpx.UnsupportedProtocol | httpx.ProxyError
    )


def error_of(response: httpx.Response) -> PcleaseClientError:
    """The exception for an error answer (``{"error": {"code", "message"}}``, or whatever
    a proxy in front of the service sent)."""
    error: Any = None
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:500]
    details = error if isinstance(error, dict) else None
    return api_error(response.status_code, code, message, response.headers, details)


# -- reading answers ---------------------------------------------------------------------


def _one(model: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: model.from_json(response.json())


def _many(model: type[M], key: str) -> Callable[[httpx.Response], list[M]]:
    return lambda response: read_list(model, key, response.json())


def _content(response: httpx.Response) -> bytes:
    return response.content


def _segment(value: str) -> str:
    if not value:
        raise ValueError("an id must not be empty")
    return quote(value, safe="")


def _query(**values: object) -> Params:
    """Query parameters without the unset ones; an iterable value repeats its key."""
    params: list[tuple[str, str | int | float]] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, str | int | float):
            params.append((key, value))
        else:
            assert isinstance(value, Iterable)
            params.extend((key, str(item)) for item in value)
    return tuple(params)


# -- profiles ----------------------------------------------------------------------------


def list_profiles() -> Call[list[ProfileInfo]]:
    return Call("GET", "/v1/profiles", _many(ProfileInfo, "profiles"))


# -- leases ------------------------------------------------------------------------------


def create_lease(
    profile: str,
    *,
    holder: Mapping[str, Any] | None = None,
    ttl_s: float | None = None,
    wait_s: float | None = None,
    idempotency_key: str | None = None,
) -> Call[LeaseInfo]:
    """A new lease; without an ``idempotency_key`` one is made up, so that a retried
    request never leases twice."""
    body: dict[str, Any] = {"profile": profile, "holder": dict(holder or {})}
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    if wait_s is not None:
        body["wait_s"] = wait_s
    key = idempotency_key or str(uuid.uuid4())
    return Call("POST", "/v1/leases", _one(LeaseInfo), json=body, headers={"Idempotency-Key": key})


def get_lease(
    lease_id: str, *, wait_s: float = 0, while_state: LeaseState | None = None
) -> Call[LeaseInfo]:
    """The lease; with ``wait_s``, once its state differs from ``while_state`` (default:
    its state now) or ``wait_s`` has passed."""
    state = while_state.value if while_state is not None else None
    return Call(
        "GET",
        f"/v1/leases/{_segment(lease_id)}",
        _one(LeaseInfo),
        params=_query(wait_s=round(wait_s, 3), state=state),
    )


def list_leases(
    *,
    state: Iterable[LeaseState] | None = None,
    context_id: str | None = None,
    dag_id: str | None = None,
    run_id: str | None = None,
    limit: int | None = None,
) -> Call[list[LeaseInfo]]:
    return Call(
        "GET",
        "/v1/leases",
        _many(LeaseInfo, "leases"),
        params=_query(
            state=None if state is None else [s.value for s in state],
            context_id=context_id,
            dag_id=dag_id,
            run_id=run_id,
            limit=limit,
        ),
    )


def heartbeat(lease_id: str) -> Call[LeaseInfo]:
    return Call("POST", f"/v1/leases/{_segment(lease_id)}/heartbeat", _one(LeaseInfo))


def release(lease_id: str) -> Call[LeaseInfo]:
    return Call("DELETE", f"/v1/leases/{_segment(lease_id)}", _one(LeaseInfo))


def release_holder(
    dag_id: str,
    run_id: str,
    *,
    task_id: str | None = None,
    map_index: int | None = None,
) -> Call[list[LeaseInfo]]:
    """Release every live lease of a DAG run, or of one of its task instances."""
    if map_index is not None and task_id is None:
        raise ValueError("map_index names a mapped task instance: give its task_id too")
    return Call(
        "DELETE",
        "/v1/leases",
        _many(LeaseInfo, "leases"),
        params=_query(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index),
    )


# -- contexts ----------------------------------------------------------------------------


def list_contexts(
    *,
    state: Iterable[ContextState] | None = None,
    profile: str | None = None,
    limit: int | None = None,
) -> Call[list[ContextInfo]]:
    return Call(
        "GET",
        "/v1/contexts",
        _many(ContextInfo, "contexts"),
        params=_query(
            state=None if state is None else [s.value for s in state], profile=profile, limit=limit
        ),
    )


def get_context(context_id: str) -> Call[ContextInfo]:
    return Call("GET", f"/v1/contexts/{_segment(context_id)}", _one(ContextInfo))


def stop_context(context_id: str) -> Call[ContextInfo]:
    """Admin: revoke the context's leases and stop it."""
    return Call("POST", f"/v1/contexts/{_segment(context_id)}/stop", _one(ContextInfo))


# -- events ------------------------------------------------------------------------------


def list_events(
    *,
    context_id: str | None = None,
    lease_id: str | None = None,
    after_id: int | None = None,
    limit: int | None = None,
) -> Call[list[EventInfo]]:
    """The audit log, newest first."""
    return Call(
        "GET",
        "/v1/events",
        _many(EventInfo, "events"),
        params=_query(context_id=context_id, lease_id=lease_id, after_id=after_id, limit=limit),
    )


# -- queries -----------------------------------------------------------------------------


def submit_query(lease_id: str, submission: Submission) -> Call[QueryInfo]:
    return Call(
        "POST",
        f"/v1/leases/{_segment(lease_id)}/queries",
        _one(QueryInfo),
        multipart=(
            {"plan": ("plan.bin", submission.plan, "application/octet-stream")},
            {"options": json.dumps(submission.options)},
        ),
        retry=Retry.UNSENT,
    )


def list_lease_queries(lease_id: str) -> Call[list[QueryInfo]]:
    return Call("GET", f"/v1/leases/{_segment(lease_id)}/queries", _many(QueryInfo, "queries"))


def get_query(query_id: str, *, wait_s: float = 0) -> Call[QueryInfo]:
    """The query; with ``wait_s``, once it has finished or ``wait_s`` has passed."""
    return Call(
        "GET",
        f"/v1/queries/{_segment(query_id)}",
        _one(QueryInfo),
        params=_query(wait_s=round(wait_s, 3)),
    )


def cancel_query(query_id: str) -> Call[QueryInfo]:
    return Call("POST", f"/v1/queries/{_segment(query_id)}/cancel", _one(QueryInfo))


def query_result(query_id: str) -> Call[bytes]:
    """A collect query's result: an Arrow IPC file (``polars.read_ipc``). Large results
    are better streamed (see :func:`spills`) than read with this call's answer."""
    return Call("GET", f"/v1/queries/{_segment(query_id)}/result", _content)


#: A result body larger than this (or of unknown size) is streamed to a temporary file and
#: read from there instead of being collected in memory, so that the body and the frame
#: read from it are never both held by the client.
RESULT_IN_MEMORY_MAX_BYTES = 8 * 1024 * 1024


def spills(response: httpx.Response, limit: int = RESULT_IN_MEMORY_MAX_BYTES) -> bool:
    """Whether a successful result answer is streamed to a file rather than read whole."""
    declared = response.headers.get("Content-Length", "")
    return not declared.isdigit() or int(declared) > limit
