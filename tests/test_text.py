"""Property tests (hypothesis) of the one text rule: every free-form text field of the API
refuses lone surrogates, NUL and other control characters with a 422 that names the field,
before anything is written, on SQLite and PostgreSQL alike; acceptable text is never refused
for its characters; and whatever is stored reads back as text that can be answered with.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from pclease_service.api.app import create_app
from pclease_service.backends.memory import MemoryBackend
from pclease_service.clock import FakeClock
from pclease_service.db.schema import events, leases, queries
from pclease_service.runtime import Service
from pclease_service.text import readable, refusal
from tests.conftest import Harness, _truncate, make_settings

EXAMPLES = settings(
    max_examples=25,
    deadline=None,  # database round trips vary; nothing here is about time
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

REFUSED = (st.integers(0x00, 0x1F) | st.integers(0x7F, 0x9F) | st.integers(0xD800, 0xDFFF)).map(chr)
# Lone surrogates cannot travel in a URL or a header (both are bytes, decoded as UTF-8 or
# Latin-1), so only control characters are tried there.
REFUSED_IN_BYTES = (st.integers(0x00, 0x1F) | st.integers(0x7F, 0x9F)).map(chr)
ACCEPTED_CHAR = st.characters(exclude_categories=("Cc", "Cs"))


def hostile(
    max_size: int, refused: st.SearchStrategy[str], alphabet: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """Acceptable text with at least one refused character somewhere in it."""
    half = (max_size - 1) // 2
    part = st.text(alphabet, max_size=half)
    return st.tuples(part, refused, part).map("".join)


# -- the rule itself ------------------------------------------------------------------------


@given(st.text(st.characters(exclude_categories=())))
def test_refusal_is_exactly_the_refused_characters(value: str) -> None:
    bad = [
        c for c in value if ord(c) <= 0x1F or 0x7F <= ord(c) <= 0x9F or 0xD800 <= ord(c) <= 0xDFFF
    ]
    problem = refusal(value)
    assert (problem is None) == (not bad)
    if bad:
        assert problem is not None
        assert f"U+{ord(bad[0]):04X}" in problem
        assert f"position {value.index(bad[0])}" in problem


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(exclude_categories=())),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=()), max_size=5), children)
    ),
    max_leaves=12,
)


@given(JSON_VALUES)
def test_readable_makes_any_stored_json_answerable(value: Any) -> None:
    repaired = readable(value)
    # What the API and the dashboard do with it: strict JSON, encoded as UTF-8.
    json.dumps(repaired, ensure_ascii=False, allow_nan=False).encode("utf-8")
    assert readable(repaired) == repaired


@given(st.text(ACCEPTED_CHAR))
def test_readable_leaves_acceptable_text_alone(value: str) -> None:
    assert readable(value) == value
    assert readable({value: [value, 1.5]}) == {value: [value, 1.5]}


def test_readable_repairs_what_cannot_be_answered() -> None:
    assert readable({"note": "a\udfffb", "\ud800": [math.nan, math.inf, 2.0]}) == {
        "note": "a\ufffdb",
        "\ufffd": [None, None, 2.0],
    }


# -- every free-form field of the API ----------------------------------------------------------


class Client:
    """A synchronous face on an in-process app whose event loop runs in a portal thread
    (hypothesis drives synchronous tests)."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, client: httpx.AsyncClient):
        self.portal = portal
        self.client = client

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(functools.partial(self.client.request, method, url, **kwargs))

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


# A header value is Latin-1 bytes: printable Latin-1 is what it can carry.
HEADER_CHAR = (st.integers(0x21, 0x7E) | st.integers(0xA0, 0xFF)).map(chr)


@dataclass(frozen=True)
class Field:
    """One free-form text field: how to send a value in it, and what the 422 must name."""

    id: str
    names: str
    max_size: int
    send: Callable[[Client, dict[str, str], str, str], Any]
    refused: st.SearchStrategy[str] = REFUSED
    min_size: int = 0
    alphabet: st.SearchStrategy[str] = ACCEPTED_CHAR

    def hostile(self) -> st.SearchStrategy[str]:
        return hostile(self.max_size, self.refused, self.alphabet)

    def accepted(self) -> st.SearchStrategy[str]:
        return st.text(self.alphabet, min_size=max(1, self.min_size), max_size=self.max_size)


def _json(body: dict[str, Any]) -> dict[str, Any]:
    # ensure_ascii: a lone surrogate travels as the JSON escape \udfff, as a client would
    # send it; it could not be encoded as UTF-8 text.
    return {
        "content": json.dumps(body).encode(),
        "headers": {"Content-Type": "application/json"},
    }


def lease_body(**holder: Any) -> Callable[[Client, dict[str, str], str, str], Any]:
    def send(client: Client, headers: dict[str, str], lease: str, value: str) -> Any:
        body = {"profile": "small", "holder": {k: v.format(value) for k, v in holder.items()}}
        request = _json(body)
        return client.post(
            "/v1/leases", content=request["content"], headers={**headers, **request["headers"]}
        )

    return send


def lease_key(client: Client, headers: dict[str, str], lease: str, value: str) -> Any:
    request = _json({"profile": "small", "holder": {value: 1}})
    return client.post(
        "/v1/leases", content=request["content"], headers={**headers, **request["headers"]}
    )


def profile(client: Client, headers: dict[str, str], lease: str, value: str) -> Any:
    request = _json({"profile": value})
    return client.post(
        "/v1/leases", content=request["content"], headers={**headers, **request["headers"]}
    )


def idempotency_key(client: Client, headers: dict[str, str], lease: str, value: str) -> Any:
    request = _json({"profile": "large"})
    raw = {**headers, **request["headers"]}
    return client.post(
        "/v1/leases",
        content=request["content"],
        headers=[(k.encode(), v.encode()) for k, v in raw.items()]
        + [(b"Idempotency-Key", value.encode("latin-1"))],
    )


def param(method: str, path: str, name: str, **others: str) -> Callable[..., Any]:
    def send(client: Client, headers: dict[str, str], lease: str, value: str) -> Any:
        return client.request(method, path, params={**others, name: value}, headers=headers)

    return send


def option(**options: str) -> Callable[..., Any]:
    def send(client: Client, headers: dict[str, str], lease: str, value: str) -> Any:
        body: dict[str, Any] = {"target": "collect", "polars_version": "2.0.0"}
        for key, template in options.items():
            if key == "labels":
                k, _, v = template.partition("=")
                body["labels"] = {k.format(value): v.format(value)}
            else:
                body[key] = template.format(value)
        return client.post(
            f"/v1/leases/{lease}/queries",
            files={"plan": ("plan.bin", b"DSL_VERSION")},
            data={"options": json.dumps(body)},
            headers=headers,
        )

    return send


FIELDS = [
    Field("profile", "profile", 63, profile, min_size=1),
    Field("holder.dag_id", "holder.dag_id", 250, lease_body(dag_id="{}")),
    Field("holder.run_id", "holder.run_id", 250, lease_body(run_id="{}")),
    Field("holder.task_id", "holder.task_id", 250, lease_body(task_id="{}")),
    Field("holder-value", "holder.note", 250, lease_body(note="{}")),
    Field("holder-key", "holder", 64, lease_key, min_size=1),
    Field(
        "idempotency-key", "Idempotency-Key", 200, idempotency_key, REFUSED_IN_BYTES, 1, HEADER_CHAR
    ),
    Field(
        "list-leases-context_id",
        "context_id",
        36,
        param("GET", "/v1/leases", "context_id"),
        REFUSED_IN_BYTES,
    ),
    Field(
        "list-leases-dag_id", "dag_id", 250, param("GET", "/v1/leases", "dag_id"), REFUSED_IN_BYTES
    ),
    Field(
        "list-leases-run_id", "run_id", 250, param("GET", "/v1/leases", "run_id"), REFUSED_IN_BYTES
    ),
    Field(
        "release-dag_id",
        "dag_id",
        250,
        param("DELETE", "/v1/leases", "dag_id", run_id="r"),
        REFUSED_IN_BYTES,
        1,
    ),
    Field(
        "release-run_id",
        "run_id",
        250,
        param("DELETE", "/v1/leases", "run_id", dag_id="d"),
        REFUSED_IN_BYTES,
        1,
    ),
    Field(
        "release-task_id",
        "task_id",
        250,
        param("DELETE", "/v1/leases", "task_id", dag_id="d", run_id="r"),
        REFUSED_IN_BYTES,
        1,
    ),
    Field(
        "contexts-profile", "profile", 63, param("GET", "/v1/contexts", "profile"), REFUSED_IN_BYTES
    ),
    Field(
        "events-context_id",
        "context_id",
        36,
        param("GET", "/v1/events", "context_id"),
        REFUSED_IN_BYTES,
    ),
    Field(
        "events-lease_id", "lease_id", 36, param("GET", "/v1/events", "lease_id"), REFUSED_IN_BYTES
    ),
    Field(
        "query-destination", "options.destination", 2048, option(target="parquet", destination="{}")
    ),
    Field(
        "query-polars_version",
        "options.polars_version",
        32,
        option(polars_version="{}"),
        min_size=1,
    ),
    Field("query-label-key", "options.labels", 64, option(labels="{}=v"), min_size=1),
    Field("query-label-value", "options.labels.k", 250, option(labels="k={}")),
]


@dataclass
class Api:
    client: Client
    service: Service
    headers: dict[str, str]
    lease: str

    def written(self) -> tuple[int, ...]:
        def count(tx: Any) -> tuple[int, ...]:
            return tuple(
                int(tx.conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in (leases, queries, events)
            )

        return self.service.db.read_sync(count)


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp_path: Path = tmp_path_factory.mktemp("text")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pclease.db'}"
    else:
        url = request.getfixturevalue("pg_database")
        _truncate(url)
    clock = FakeClock()
    service = Service(
        make_settings(tmp_path, url),
        clock=clock,
        backend=MemoryBackend(clock),
        run_reconciler=False,
    )
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(service.start)
        transport = httpx.ASGITransport(app=create_app(service))
        async_client = httpx.AsyncClient(transport=transport, base_url="http://pclease.test")
        client = Client(portal, async_client)
        h = Harness(service, clock, MemoryBackend(clock), async_client, {})
        headers = h.token("text-admin", "admin")
        made = client.post("/v1/leases", json={"profile": "large"}, headers=headers)
        assert made.status_code == 201, made.text
        try:
            yield Api(client, service, headers, made.json()["id"])
        finally:
            portal.call(async_client.aclose)
            portal.call(service.stop)


@pytest.mark.parametrize("field", FIELDS, ids=[f.id for f in FIELDS])
@EXAMPLES
@given(data=st.data())
def test_hostile_text_is_refused_naming_the_field_before_anything_is_written(
    api: Api, field: Field, data: st.DataObject
) -> None:
    value = data.draw(field.hostile(), label="value")
    before = api.written()
    response = field.send(api.client, api.headers, api.lease, value)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert field.names in error["message"], error["message"]
    assert "printable UTF-8 text" in error["message"]
    assert api.written() == before


@pytest.mark.parametrize("field", FIELDS, ids=[f.id for f in FIELDS])
@EXAMPLES
@given(data=st.data())
def test_acceptable_text_is_never_refused_for_its_characters(
    api: Api, field: Field, data: st.DataObject
) -> None:
    value = data.draw(field.accepted(), label="value")
    response = field.send(api.client, api.headers, api.lease, value)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "printable UTF-8" not in response.json()["error"]["message"]
