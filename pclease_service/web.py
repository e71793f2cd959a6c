"""What the API and the dashboard share about HTTP."""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Match, Route


def allowed_methods(request: Request) -> str:
    """The ``Allow`` header of a 405: the methods of every route on the request's path.

    Starlette names only the methods of the first route whose path matched, and each
    method of a path is its own route here (``/v1/leases`` has three).
    """
    methods: set[str] = set()
    for route in request.app.router.routes:
        if not isinstance(route, Route) or not route.methods:
            continue
        if route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))
