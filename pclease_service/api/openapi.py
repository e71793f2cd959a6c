"""The OpenAPI document, FastAPI's made to describe what the service really answers, and
the pages that show it (``/docs`` and ``/redoc``, with their files served by the service, so
they work where no CDN can be reached).

Routes declare their own error statuses with :func:`service.api.schemas.errors`. Two
things FastAPI cannot be told per route are settled here, once:

- FastAPI adds a 422 with its own ``HTTPValidationError`` body to every route that has
  parameters. pclease never answers with that body (every error is ``ErrorOut``), and
  routes whose input can be refused declare their 422 themselves, so FastAPI's is dropped.
- A query's options travel as a JSON string in a multipart form; the document says so
  (``contentMediaType``) and gives that string its schema, ``QueryOptions``.
- Links say where the id in an answer leads (a new lease to its heartbeat, release and
  queries; a new query to its state and result), for readers and for stateful fuzzers.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from pclease_service.api.schemas import QueryOptions

_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")
_REF = "#/components/schemas/{model}"

_LEASE_ID = {"lease_id": "$response.body#/id"}
_QUERY_ID = {"query_id": "$response.body#/id"}
#: (method, path, status) of an answer -> its links: name -> (method, path, parameters).
_LINKS: dict[tuple[str, str, str], dict[str, tuple[str, str, dict[str, str]]]] = {
    ("post", "/v1/leases", status): {
        "GetLease": ("get", "/v1/leases/{lease_id}", _LEASE_ID),
        "Heartbeat": ("post", "/v1/leases/{lease_id}/heartbeat", _LEASE_ID),
        "Release": ("delete", "/v1/leases/{lease_id}", _LEASE_ID),
        "SubmitQuery": ("post", "/v1/leases/{lease_id}/queries", _LEASE_ID),
        "ListQueries": ("get", "/v1/leases/{lease_id}/queries", _LEASE_ID),
        "GetContext": (
            "get",
            "/v1/contexts/{context_id}",
            {"context_id": "$response.body#/context_id"},
        ),
    }
    for status in ("200", "201")
} | {
    ("post", "/v1/leases/{lease_id}/queries", "202"): {
        "GetQuery": ("get", "/v1/queries/{query_id}", _QUERY_ID),
        "CancelQuery": ("post", "/v1/queries/{query_id}/cancel", _QUERY_ID),
        "QueryResult": ("get", "/v1/queries/{query_id}/result", _QUERY_ID),
    }
}


def complete(document: dict[str, Any]) -> dict[str, Any]:
    """Finish FastAPI's ``document`` in place (and return it)."""
    schemas: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    for item in document.get("paths", {}).values():
        for operation in item.values():
            invalid = operation.get("responses", {}).get("422", {})
            if "HTTPValidationError" in repr(invalid.get("content", {})):
                del operation["responses"]["422"]
    for name in _FASTAPI_VALIDATION_SCHEMAS:
        schemas.pop(name, None)

    paths = document.get("paths", {})
    for (method, path, status), links in _LINKS.items():
        response = paths[path][method]["responses"][status]
        response["links"] = {
            name: {"operationId": paths[to][verb]["operationId"], "parameters": parameters}
            for name, (verb, to, parameters) in links.items()
        }

    options = QueryOptions.model_json_schema(ref_template=_REF)
    schemas.update(options.pop("$defs", {}))
    schemas["QueryOptions"] = options
    for name, schema in schemas.items():
        if name.startswith("Body_submit_query"):
            schema["properties"]["options"].update(
                contentMediaType="application/json",
                contentSchema={"$ref": _REF.format(model="QueryOptions")},
            )
    return document


_ASSETS = "/docs/assets"


def install_pages(app: FastAPI) -> None:
    """Serve ``/docs`` (Swagger UI) and ``/redoc`` from files shipped by ``fastapi-offline``
    (create the app with ``docs_url=None, redoc_url=None``)."""
    app.mount(
        _ASSETS,
        StaticFiles(directory=str(files("fastapi_offline") / "static")),
        name="docs-assets",
    )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{_ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title=f"{app.title} API",
            redoc_js_url=f"{_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{_ASSETS}/favicon.png",
            with_google_fonts=False,
        )
