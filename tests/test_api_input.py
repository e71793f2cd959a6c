"""Bad input on every route: a clear error in the one error shape, never a 500 or a
stack trace, and nothing already accepted is lost.

The cases share one service per database (they only read or are refused), so the whole
table runs in a couple of seconds; each case is still its own test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import pytest_asyncio
from fastapi.routing import APIRoute

from pclease_service.api import v1
from pclease_service.api.app import create_app
from pclease_service.backends.memory import MemoryBackend
from pclease_service.clock import FakeClock
from pclease_service.runtime import Service
from tests.conftest import Harness, _truncate, make_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

INVALID = (422, "invalid_input")
UNREADABLE = (400, "bad_request")
UNKNOWN_PROFILE = (422, "unknown_profile")
TOO_LARGE = (413, "payload_too_large")
NO_LEASE = (404, "lease_not_found")
NO_CONTEXT = (404, "context_not_found")
NO_ROUTE = (404, "not_found")
NO_QUERY = (404, "query_not_found")
PLAN_INVALID = (422, "plan_invalid")
GOOD_OPTIONS = '{"target": "collect", "polars_version": "2.0.0"}'


def submission(plan: bytes = b"", options: str = GOOD_OPTIONS) -> dict[str, Any]:
    return {"files": {"plan": ("plan.bin", plan)}, "data": {"options": options}}


BAD_METHOD = (405, "method_not_allowed")

MAX_BYTES = 65536  # the default max_request_bytes
JSON = {"Content-Type": "application/json"}
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"
LONG_ID = "a" * 5000


class Bad(NamedTuple):
    """One bad request: what is sent, the status and code expected, and words the message
    must contain so that it names the field or the fix. ``{lease}`` and ``{context}`` in
    the path stand for a real lease and its context."""

    id: str
    method: str
    path: str
    expect: tuple[int, str]
    hints: tuple[str, ...]
    request: dict[str, Any]


def bad(
    case_id: str, method: str, path: str, expect: tuple[int, str], *hints: str, **request: Any
) -> Bad:
    return Bad(case_id, method, path, expect, hints, request)


def holder(value: Any) -> dict[str, Any]:
    return {"profile": "small", "holder": value}


# fmt: off
CASES = [
    # -- POST /v1/leases: the body as a whole ------------------------------------------------
    bad("body-not-json", "POST", "/v1/leases", INVALID, "not valid JSON",
        content=b"{profile: small", headers=JSON),
    bad("body-array", "POST", "/v1/leases", INVALID, "JSON object", json=["small"]),
    bad("body-string", "POST", "/v1/leases", INVALID, "JSON object", json="small"),
    bad("body-number", "POST", "/v1/leases", INVALID, "JSON object", json=5),
    bad("body-null", "POST", "/v1/leases", INVALID, "JSON object",
        content=b"null", headers=JSON),
    bad("body-missing", "POST", "/v1/leases", INVALID, "JSON object"),
    bad("body-wrong-content-type", "POST", "/v1/leases", INVALID, "application/json",
        content=b'{"profile": "small"}', headers={"Content-Type": "text/plain"}),
    bad("body-not-utf8", "POST", "/v1/leases", UNREADABLE, "UTF-8",
        content=b'{"profile": "\xff\xfe"}', headers=JSON),
    bad("body-number-too-long-to-parse", "POST", "/v1/leases", UNREADABLE, "JSON object",
        content=b'{"profile": "small", "ttl_s": ' + b"9" * 5000 + b"}", headers=JSON),
    bad("body-over-limit", "POST", "/v1/leases", TOO_LARGE, str(MAX_BYTES),
        json=holder({"note": "x" * MAX_BYTES})),
    bad("body-over-limit-chunked", "POST", "/v1/leases", TOO_LARGE, str(MAX_BYTES),
        chunked=b"x" * (MAX_BYTES + 1)),
    bad("body-over-limit-on-another-route", "POST", "/v1/leases/{lease}/heartbeat",
        TOO_LARGE, str(MAX_BYTES), content=b"x" * (MAX_BYTES + 1)),
    # -- POST /v1/leases: fields ---------------------------------------------------------------
    bad("profile-missing", "POST", "/v1/leases", INVALID, "profile", "Field required",
        json={"ttl_s": 30}),
    bad("profile-unknown", "POST", "/v1/leases", UNKNOWN_PROFILE, "'gpu'", "large, small",
        json={"profile": "gpu"}),
    bad("profile-wrong-type", "POST", "/v1/leases", INVALID, "profile", json={"profile": 5}),
    bad("profile-empty", "POST", "/v1/leases", INVALID, "profile", json={"profile": ""}),
    bad("profile-overlong", "POST", "/v1/leases", INVALID, "profile", "63",
        json={"profile": "s" * 64}),
    bad("field-unknown", "POST", "/v1/leases", INVALID, "gpus", "unknown field",
        json={"profile": "small", "gpus": 1}),
    bad("ttl-wrong-type", "POST", "/v1/leases", INVALID, "ttl_s", "number",
        json={"profile": "small", "ttl_s": "30"}),
    bad("ttl-boolean", "POST", "/v1/leases", INVALID, "ttl_s",
        json={"profile": "small", "ttl_s": True}),
    bad("ttl-negative", "POST", "/v1/leases", INVALID, "ttl_s", "greater than 0",
        json={"profile": "small", "ttl_s": -1}),
    bad("ttl-zero", "POST", "/v1/leases", INVALID, "ttl_s",
        json={"profile": "small", "ttl_s": 0}),
    bad("ttl-below-min", "POST", "/v1/leases", INVALID, "ttl_s", "between 5 and 3600",
        json={"profile": "small", "ttl_s": 1}),
    bad("ttl-above-max", "POST", "/v1/leases", INVALID, "ttl_s", "between 5 and 3600",
        "heartbeat", json={"profile": "small", "ttl_s": 3601}),
    bad("ttl-huge", "POST", "/v1/leases", INVALID, "ttl_s", "3600",
        json={"profile": "small", "ttl_s": 1e308}),
    bad("ttl-infinity", "POST", "/v1/leases", INVALID, "ttl_s",
        content=b'{"profile": "small", "ttl_s": Infinity}', headers=JSON),
    bad("ttl-nan", "POST", "/v1/leases", INVALID, "ttl_s",
        content=b'{"profile": "small", "ttl_s": NaN}', headers=JSON),
    bad("wait-negative", "POST", "/v1/leases", INVALID, "wait_s",
        json={"profile": "small", "wait_s": -1}),
    bad("wait-huge", "POST", "/v1/leases", INVALID, "wait_s", "between 0 and 300",
        json={"profile": "small", "wait_s": 1e9}),
    bad("wait-wrong-type", "POST", "/v1/leases", INVALID, "wait_s",
        json={"profile": "small", "wait_s": "soon"}),
    bad("idempotency-key-too-long", "POST", "/v1/leases", INVALID, "Idempotency-Key", "200",
        json={"profile": "small"}, headers={"Idempotency-Key": "k" * 201}),
    bad("idempotency-key-empty", "POST", "/v1/leases", INVALID, "Idempotency-Key",
        json={"profile": "small"}, headers={"Idempotency-Key": ""}),
    # -- POST /v1/leases: holder ---------------------------------------------------------------
    bad("holder-string", "POST", "/v1/leases", INVALID, "holder", "JSON object",
        json=holder("etl/r1")),
    bad("holder-array", "POST", "/v1/leases", INVALID, "holder", "JSON object",
        json=holder(["etl"])),
    bad("holder-nested-object", "POST", "/v1/leases", INVALID, "holder.owner",
        "string, number or boolean", json=holder({"owner": {"team": "data"}})),
    bad("holder-nested-list", "POST", "/v1/leases", INVALID, "holder.tags",
        json=holder({"tags": ["a"]})),
    bad("holder-null-extra", "POST", "/v1/leases", INVALID, "holder.note",
        json=holder({"note": None})),
    bad("holder-too-many-keys", "POST", "/v1/leases", INVALID, "at most 20 keys",
        json=holder({f"k{i}": i for i in range(21)})),
    bad("holder-overlong-dag-id", "POST", "/v1/leases", INVALID, "holder.dag_id", "250",
        json=holder({"dag_id": "d" * 251})),
    bad("holder-overlong-value", "POST", "/v1/leases", INVALID, "holder.note", "250",
        json=holder({"note": "n" * 251})),
    bad("holder-overlong-key", "POST", "/v1/leases", INVALID, "64 characters",
        json=holder({"k" * 65: 1})),
    bad("holder-dag-id-wrong-type", "POST", "/v1/leases", INVALID, "holder.dag_id",
        json=holder({"dag_id": 7})),
    bad("holder-try-number-negative", "POST", "/v1/leases", INVALID, "holder.try_number",
        json=holder({"try_number": -1})),
    bad("holder-try-number-boolean", "POST", "/v1/leases", INVALID, "holder.try_number",
        json=holder({"try_number": True})),
    bad("holder-map-index-below-minus-one", "POST", "/v1/leases", INVALID,
        "holder.map_index", json=holder({"map_index": -2})),
    bad("holder-infinite-number", "POST", "/v1/leases", INVALID, "holder.cost", "finite",
        content=b'{"profile": "small", "holder": {"cost": Infinity}}', headers=JSON),
    bad("holder-nul-in-value", "POST", "/v1/leases", INVALID, "holder.dag_id", "NUL",
        json=holder({"dag_id": "etl\x00"})),
    bad("holder-nul-in-key", "POST", "/v1/leases", INVALID, "NUL", json=holder({"k\x00": 1})),
    # -- GET /v1/leases ------------------------------------------------------------------------
    bad("list-leases-bad-state", "GET", "/v1/leases", INVALID, "state", "'pending'",
        params={"state": "alive"}),
    bad("list-leases-one-bad-state-of-two", "GET", "/v1/leases", INVALID, "state",
        params={"state": ["active", "alive"]}),
    bad("list-leases-negative-limit", "GET", "/v1/leases", INVALID, "limit",
        params={"limit": -1}),
    bad("list-leases-zero-limit", "GET", "/v1/leases", INVALID, "limit", params={"limit": 0}),
    bad("list-leases-huge-limit", "GET", "/v1/leases", INVALID, "limit", "5000",
        params={"limit": 10**30}),
    bad("list-leases-limit-not-a-number", "GET", "/v1/leases", INVALID, "limit",
        params={"limit": "all"}),
    bad("list-leases-overlong-context-id", "GET", "/v1/leases", INVALID, "context_id", "36",
        params={"context_id": "c" * 37}),
    bad("list-leases-nul-in-dag-id", "GET", "/v1/leases", INVALID, "dag_id", "NUL",
        params={"dag_id": "etl\x00"}),
    # -- GET /v1/leases/{id} -------------------------------------------------------------------
    bad("get-lease-unknown", "GET", f"/v1/leases/{UNKNOWN_ID}", NO_LEASE, UNKNOWN_ID,
        "GET /v1/leases"),
    bad("get-lease-very-long-id", "GET", f"/v1/leases/{LONG_ID}", NO_LEASE, "GET /v1/leases"),
    bad("get-lease-nul-id", "GET", "/v1/leases/%00", NO_LEASE, "GET /v1/leases"),
    bad("get-lease-percent-junk", "GET", "/v1/leases/%ff%fe%c0", NO_LEASE, "GET /v1/leases"),
    bad("get-lease-wait-over-long-poll-max", "GET", "/v1/leases/{lease}", INVALID, "wait_s",
        "60", params={"wait_s": 61}),
    bad("get-lease-wait-negative", "GET", "/v1/leases/{lease}", INVALID, "wait_s",
        params={"wait_s": -1}),
    bad("get-lease-wait-nan", "GET", "/v1/leases/{lease}", INVALID, "wait_s",
        params={"wait_s": "nan"}),
    bad("get-lease-wait-infinite", "GET", "/v1/leases/{lease}", INVALID, "wait_s",
        params={"wait_s": "inf"}),
    bad("get-lease-bad-state", "GET", "/v1/leases/{lease}", INVALID, "state",
        params={"wait_s": 1, "state": "alive"}),
    # -- POST /v1/leases/{id}/heartbeat and DELETE /v1/leases/{id} ----------------------------
    bad("heartbeat-unknown", "POST", f"/v1/leases/{UNKNOWN_ID}/heartbeat", NO_LEASE,
        UNKNOWN_ID),
    bad("heartbeat-very-long-id", "POST", f"/v1/leases/{LONG_ID}/heartbeat", NO_LEASE,
        "GET /v1/leases"),
    bad("heartbeat-nul-id", "POST", "/v1/leases/%00/heartbeat", NO_LEASE, "GET /v1/leases"),
    bad("release-unknown", "DELETE", f"/v1/leases/{UNKNOWN_ID}", NO_LEASE, UNKNOWN_ID),
    bad("release-very-long-id", "DELETE", f"/v1/leases/{LONG_ID}", NO_LEASE,
        "GET /v1/leases"),
    bad("release-nul-id", "DELETE", "/v1/leases/%00", NO_LEASE, "GET /v1/leases"),
    bad("release-percent-junk", "DELETE", "/v1/leases/%e2%28%a1", NO_LEASE,
        "GET /v1/leases"),
    # -- DELETE /v1/leases?dag_id=&run_id= -----------------------------------------------------
    bad("bulk-release-no-holder", "DELETE", "/v1/leases", INVALID, "dag_id", "run_id"),
    bad("bulk-release-no-run-id", "DELETE", "/v1/leases", INVALID, "run_id",
        params={"dag_id": "etl"}),
    bad("bulk-release-no-dag-id", "DELETE", "/v1/leases", INVALID, "dag_id",
        params={"run_id": "r1"}),
    bad("bulk-release-empty-dag-id", "DELETE", "/v1/leases", INVALID, "dag_id",
        params={"dag_id": "", "run_id": "r1"}),
    bad("bulk-release-overlong-task-id", "DELETE", "/v1/leases", INVALID, "task_id", "250",
        params={"dag_id": "etl", "run_id": "r1", "task_id": "t" * 251}),
    bad("bulk-release-nul-in-run-id", "DELETE", "/v1/leases", INVALID, "run_id", "NUL",
        params={"dag_id": "etl", "run_id": "r\x00"}),
    bad("bulk-release-bad-map-index", "DELETE", "/v1/leases", INVALID, "map_index", "-1",
        params={"dag_id": "etl", "run_id": "r1", "task_id": "t", "map_index": -2}),
    # -- GET /v1/contexts, GET /v1/contexts/{id}, POST /v1/contexts/{id}/stop ------------------
    bad("list-contexts-bad-state", "GET", "/v1/contexts", INVALID, "state", "'running'",
        params={"state": "up"}),
    bad("list-contexts-zero-limit", "GET", "/v1/contexts", INVALID, "limit",
        params={"limit": 0}),
    bad("list-contexts-huge-limit", "GET", "/v1/contexts", INVALID, "limit", "5000",
        params={"limit": 5001}),
    bad("list-contexts-overlong-profile", "GET", "/v1/contexts", INVALID, "profile", "63",
        params={"profile": "p" * 64}),
    bad("list-contexts-nul-in-profile", "GET", "/v1/contexts", INVALID, "profile", "NUL",
        params={"profile": "small\x00"}),
    bad("get-context-unknown", "GET", f"/v1/contexts/{UNKNOWN_ID}", NO_CONTEXT, UNKNOWN_ID,
        "GET /v1/contexts"),
    bad("get-context-very-long-id", "GET", f"/v1/contexts/{LONG_ID}", NO_CONTEXT,
        "GET /v1/contexts"),
    bad("get-context-nul-id", "GET", "/v1/contexts/%00", NO_CONTEXT, "GET /v1/contexts"),
    bad("get-context-percent-junk", "GET", "/v1/contexts/%ff", NO_CONTEXT,
        "GET /v1/contexts"),
    bad("stop-context-unknown", "POST", f"/v1/contexts/{UNKNOWN_ID}/stop", NO_CONTEXT,
        UNKNOWN_ID),
    bad("stop-context-very-long-id", "POST", f"/v1/contexts/{LONG_ID}/stop", NO_CONTEXT,
        "GET /v1/contexts"),
    bad("stop-context-nul-id", "POST", "/v1/contexts/%00/stop", NO_CONTEXT,
        "GET /v1/contexts"),
    # -- GET /v1/events ------------------------------------------------------------------------
    bad("events-zero-limit", "GET", "/v1/events", INVALID, "limit", params={"limit": 0}),
    bad("events-huge-limit", "GET", "/v1/events", INVALID, "limit", "5000",
        params={"limit": 10**9}),
    bad("events-negative-after-id", "GET", "/v1/events", INVALID, "after_id",
        params={"after_id": -1}),
    bad("events-after-id-past-the-column", "GET", "/v1/events", INVALID, "after_id",
        params={"after_id": 2**63}),
    bad("events-huge-after-id", "GET", "/v1/events", INVALID, "after_id",
        params={"after_id": 10**30}),
    bad("events-after-id-not-a-number", "GET", "/v1/events", INVALID, "after_id",
        params={"after_id": "latest"}),
    bad("events-overlong-lease-id", "GET", "/v1/events", INVALID, "lease_id", "36",
        params={"lease_id": "l" * 37}),
    bad("events-nul-in-context-id", "GET", "/v1/events", INVALID, "context_id", "NUL",
        params={"context_id": "\x00"}),
    # -- GET /healthz, /readyz, /v1/profiles take no input but a body, and the limit holds
    bad("healthz-body-over-limit", "GET", "/healthz", TOO_LARGE, str(MAX_BYTES),
        content=b"x" * (MAX_BYTES + 1)),
    bad("readyz-body-over-limit-chunked", "GET", "/readyz", TOO_LARGE, str(MAX_BYTES),
        chunked=b"x" * (MAX_BYTES + 1)),
    bad("profiles-body-over-limit-chunked", "GET", "/v1/profiles", TOO_LARGE,
        str(MAX_BYTES), chunked=b"x" * (MAX_BYTES + 1)),
    # -- wrong methods and unknown routes ------------------------------------------------------
    bad("healthz-post", "POST", "/healthz", BAD_METHOD, "POST", "/healthz"),
    bad("readyz-delete", "DELETE", "/readyz", BAD_METHOD, "DELETE", "/readyz"),
    bad("profiles-post", "POST", "/v1/profiles", BAD_METHOD, "POST", "/v1/profiles"),
    bad("leases-put", "PUT", "/v1/leases", BAD_METHOD, "PUT", "/v1/leases"),
    bad("lease-patch", "PATCH", "/v1/leases/{lease}", BAD_METHOD, "PATCH", "/docs"),
    bad("heartbeat-get", "GET", "/v1/leases/{lease}/heartbeat", BAD_METHOD, "GET"),
    bad("contexts-post", "POST", "/v1/contexts", BAD_METHOD, "POST"),
    bad("context-delete", "DELETE", "/v1/contexts/{context}", BAD_METHOD, "DELETE"),
    bad("stop-get", "GET", "/v1/contexts/{context}/stop", BAD_METHOD, "GET"),
    bad("events-delete", "DELETE", "/v1/events", BAD_METHOD, "DELETE", "/v1/events"),
    bad("unknown-route", "GET", "/v1/nope", NO_ROUTE, "/v1/nope", "/docs"),
    bad("unknown-version", "GET", "/v2/leases", NO_ROUTE, "/v2/leases"),
    bad("unknown-sub-route", "POST", "/v1/leases/{lease}/renew", NO_ROUTE, "/docs"),
    bad("path-traversal", "GET", "/v1/leases/..%2f..%2fetc%2fpasswd", NO_ROUTE, "/docs"),
    # -- queries --------------------------------------------------------------------------
    bad("query-no-multipart", "POST", "/v1/leases/{lease}/queries", INVALID, "plan",
        json={"plan": "x"}),
    bad("query-options-not-json", "POST", "/v1/leases/{lease}/queries", INVALID,
        "options must be a JSON object", **submission(b"DSL_VERSION", "{target")),
    bad("query-options-array", "POST", "/v1/leases/{lease}/queries", INVALID,
        "options must be a JSON object", **submission(b"DSL_VERSION", "[]")),
    bad("query-unknown-target", "POST", "/v1/leases/{lease}/queries", INVALID,
        "options.target", **submission(b"x", '{"target": "xlsx", "polars_version": "2"}')),
    bad("query-sink-without-destination", "POST", "/v1/leases/{lease}/queries", INVALID,
        "destination", **submission(b"x", '{"target": "parquet", "polars_version": "2"}')),
    bad("query-unknown-option", "POST", "/v1/leases/{lease}/queries", INVALID,
        "options.gpu", **submission(b"x", '{"target": "collect", "polars_version": "2", '
                                          '"gpu": true}')),
    bad("query-not-a-plan", "POST", "/v1/leases/{lease}/queries", PLAN_INVALID,
        "not a Polars plan", **submission(b"SELECT * FROM secrets")),
    bad("query-truncated-header", "POST", "/v1/leases/{lease}/queries", PLAN_INVALID,
        "truncated", **submission(b"DSL_VERSION\x18\x00")),
    bad("query-unknown-lease", "POST", f"/v1/leases/{UNKNOWN_ID}/queries", NO_LEASE,
        UNKNOWN_ID, **submission(b"DSL_VERSION")),
    bad("query-list-unknown-lease", "GET", f"/v1/leases/{UNKNOWN_ID}/queries", NO_LEASE,
        UNKNOWN_ID),
    bad("query-unknown", "GET", f"/v1/queries/{UNKNOWN_ID}", NO_QUERY, UNKNOWN_ID),
    bad("query-very-long-id", "GET", f"/v1/queries/{LONG_ID}", NO_QUERY, "..."),
    bad("query-negative-wait", "GET", f"/v1/queries/{UNKNOWN_ID}", INVALID, "wait_s",
        params={"wait_s": -1}),
    bad("query-cancel-unknown", "POST", f"/v1/queries/{UNKNOWN_ID}/cancel", NO_QUERY,
        UNKNOWN_ID),
    bad("query-result-unknown", "GET", f"/v1/queries/{UNKNOWN_ID}/result", NO_QUERY,
        UNKNOWN_ID),
]
# fmt: on


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def send(h: Harness, case: Bad, lease: dict[str, Any]) -> httpx.Response:
    request = dict(case.request)
    headers = {**h.headers, **request.pop("headers", {})}
    if "chunked" in request:  # no Content-Length: the size is only known while reading
        request["content"] = _chunks(request.pop("chunked"))
    path = case.path.format(lease=lease["id"], context=lease["context_id"])
    return await h.client.request(case.method, path, headers=headers, **request)


def assert_error(response: httpx.Response, case: Bad) -> None:
    status, code = case.expect
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert len(message) < 1000, "messages stay short even when the input was huge"
    for hint in case.hints:
        assert hint in message, f"{hint!r} not in {message!r}"
    if status == 405:
        assert response.headers["Allow"]


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def shared_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.mktemp('api-input') / 'pclease.db'}"
    url: str = request.getfixturevalue("pg_database")
    _truncate(url)
    return url


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(
    shared_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Harness, dict[str, Any]]]:
    """One service for every case on this database, with one good lease to point at."""
    tmp_path: Path = tmp_path_factory.mktemp("api-input-data")
    clock = FakeClock()
    backend = MemoryBackend(clock)
    settings = make_settings(tmp_path, shared_database_url)
    service = Service(settings, clock=clock, backend=backend, run_reconciler=False)
    await service.start()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(service)), base_url="http://pclease.test"
    )
    h = Harness(service, clock, backend, client, {})
    h.headers = h.token("input-admin", "admin")
    lease = await h.lease(holder={"dag_id": "etl", "run_id": "r1"})
    yield h, lease
    await client.aclose()
    await service.stop()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_bad_input_gets_a_clear_error(
    shared: tuple[Harness, dict[str, Any]], case: Bad
) -> None:
    h, lease = shared
    assert_error(await send(h, case, lease), case)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/v1/profiles"),
        ("GET", "/v1/contexts"),
        ("GET", "/v1/events"),
    ],
)
async def test_unknown_query_parameters_are_ignored_on_reads(
    shared: tuple[Harness, dict[str, Any]], method: str, path: str
) -> None:
    h, _ = shared
    response = await h.client.request(
        method, path, params={"verbose": "yes", "x\x00": "\x00"}, headers=h.headers
    )
    assert response.status_code == 200, response.text


async def test_a_chunked_body_under_the_limit_is_read_whole(
    shared: tuple[Harness, dict[str, Any]],
) -> None:
    h, _ = shared
    body = b'{"profile": "small", "holder": {"note": "' + b"n" * 250 + b'"}}'
    response = await h.client.post(
        "/v1/leases", content=_chunks(body, size=7), headers={**h.headers, **JSON}
    )
    assert response.status_code == 201, response.text
    assert response.json()["holder"] == {"note": "n" * 250}


async def test_a_barrage_of_bad_requests_loses_nothing(
    shared: tuple[Harness, dict[str, Any]],
) -> None:
    h, first = shared
    worker = h.token("barrage-worker", "lease")
    lease = await h.lease("large", headers=worker, holder={"dag_id": "etl", "run_id": "r9"})
    await h.settle()
    before_lease = await h.get_lease(lease["id"])
    before_context = await h.context(lease["context_id"])
    assert before_lease["state"] == "active"

    for case in CASES:
        assert_error(await send(h, case, lease), case)

    assert await h.get_lease(lease["id"]) == before_lease
    after_context = await h.context(lease["context_id"])
    assert after_context["state"] == "running"
    assert after_context["refcount"] == before_context["refcount"] == 1
    listed = await h.client.get("/v1/leases", headers=worker)
    assert [x["id"] for x in listed.json()["leases"]] == [lease["id"]]
    assert (await h.get_lease(first["id"]))["state"] == "active"
    beat = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=worker)
    assert beat.status_code == 200, beat.text


async def test_every_route_has_bad_input_cases() -> None:
    """A new route must come with its bad-input cases in the table above."""
    routes = {
        (method, route.path)
        for route in v1.router.routes
        if isinstance(route, APIRoute)
        for method in route.methods
    } | {("GET", "/healthz"), ("GET", "/readyz")}
    covered = {
        (method, route_path)
        for case in CASES
        for method, route_path in routes
        if case.method == method and _matches(route_path, case.path)
    }
    assert routes - covered == set()


def _matches(route_path: str, path: str) -> bool:
    route_parts, parts = route_path.split("/"), path.split("/")
    return len(route_parts) == len(parts) and all(
        r == p or r.startswith("{") for r, p in zip(route_parts, parts, strict=True)
    )
