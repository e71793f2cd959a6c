"""The OpenAPI document describes the API that is really served: a valid OpenAPI 3.1
document, the bearer token on every /v1 route, the one error body on every error status,
examples for the request bodies, and ``Allow`` headers that list every method of a path.

The live half (schemathesis against a real server) is in ``test_contract_live.py``; the
rendered ``/docs`` page in ``test_browser.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from openapi_spec_validator import validate

from pclease_service.api.app import create_app
from pclease_service.api.schemas import LeaseRequest, QueryOptions
from pclease_service.backends.memory import MemoryBackend
from pclease_service.clock import FakeClock
from pclease_service.runtime import Service
from tests.conftest import Harness, make_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def h(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Harness]:
    tmp_path: Path = tmp_path_factory.mktemp("openapi")
    clock = FakeClock()
    backend = MemoryBackend(clock)
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'pclease.db'}")
    service = Service(settings, clock=clock, backend=backend, run_reconciler=False)
    await service.start()
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(service)), base_url="http://pclease.test"
    )
    harness = Harness(service, clock, backend, client, {})
    harness.headers = harness.token("openapi-admin", "admin")
    yield harness
    await client.aclose()
    await service.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def document(h: Harness) -> dict[str, Any]:
    response = await h.client.get("/openapi.json")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    data: dict[str, Any] = response.json()
    return data


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]


async def test_the_document_is_valid_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises with the first violation of the OpenAPI 3.1 schema
    assert len(operations(document)) >= 19


async def test_every_v1_route_declares_the_bearer_token(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["token"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "An API token: `pclease token create NAME --scope lease|read|admin`.",
    }
    for method, path, operation in operations(document):
        if path.startswith("/v1/"):
            assert operation.get("security") == [{"token": []}], (method, path)
            assert "401" in operation["responses"], (method, path)
        else:
            assert "security" not in operation, (method, path)


async def test_every_error_status_has_the_one_error_body(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    assert schemas["ErrorOut"]["required"] == ["error"]
    assert sorted(schemas["ErrorBody"]["required"]) == ["code", "message"]
    assert "HTTPValidationError" not in schemas
    assert "HTTPValidationError" not in str(document)
    checked = 0
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")) and path.startswith("/v1/"):
                schema = response["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorOut"}, (method, path)
                checked += 1
    assert checked > 40


async def test_request_bodies_carry_examples_that_are_valid(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    lease_examples = schemas["LeaseRequest"]["examples"]
    query_examples = schemas["QueryOptions"]["examples"]
    assert lease_examples and query_examples
    for example in lease_examples:
        LeaseRequest.model_validate(example)
    for example in query_examples:
        QueryOptions.model_validate(example)
    [form] = [s for name, s in schemas.items() if name.startswith("Body_submit_query")]
    options = form["properties"]["options"]
    assert options["contentMediaType"] == "application/json"
    assert options["contentSchema"] == {"$ref": "#/components/schemas/QueryOptions"}
    for example in options["examples"]:
        QueryOptions.model_validate_json(example)


async def test_free_form_text_is_described_with_its_rule(document: dict[str, Any]) -> None:
    holder = document["components"]["schemas"]["Holder"]
    dag_id = holder["properties"]["dag_id"]["anyOf"][0]
    assert dag_id == {"type": "string", "maxLength": 250, "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"}
    [dag_param] = [
        p for p in document["paths"]["/v1/leases"]["get"]["parameters"] if p["name"] == "dag_id"
    ]
    assert dag_param["schema"]["anyOf"][0]["pattern"] == "^[^\\x00-\\x1f\\x7f-\\x9f]*$"


async def test_405_allows_every_method_the_path_serves(
    h: Harness, document: dict[str, Any]
) -> None:
    for path, item in document["paths"].items():
        served = {method.upper() for method in item}
        url = path.format(lease_id="x", context_id="x", query_id="x")
        for method in sorted(METHODS - served):
            response = await h.client.request(method, url, headers=h.headers)
            assert response.status_code == 405, (method, url, response.text)
            assert set(response.headers["Allow"].split(", ")) == served, (method, url)
            assert response.json()["error"]["code"] == "method_not_allowed"
    page = await h.client.put("/ui/login")
    assert page.status_code == 405
    assert page.headers["Allow"] == "GET, POST"


async def test_docs_pages_and_their_files_are_served_by_the_service(h: Harness) -> None:
    for path in ("/docs", "/redoc"):
        page = await h.client.get(path)
        assert page.status_code == 200, page.text
        assert "/openapi.json" in page.text
        assert "cdn." not in page.text and "fonts.googleapis" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        response = await h.client.get(f"/docs/assets/{asset}")
        assert response.status_code == 200, asset
        assert len(response.content) > 10_000
