"""Every error pclease reports to a caller, and its HTTP mapping.

::

    PcleaseError                      500 internal_error
    ├── BadRequest                    400 bad_request
    ├── InvalidInput                  422 invalid_input
    │   ├── UnknownProfile            422 unknown_profile
    │   └── PlanRefused               422 plan_invalid | python_udf_refused |
    │                                     plan_version_mismatch | plan_refused
    ├── Unauthorized                  401 unauthorized
    ├── Forbidden                     403 forbidden
    ├── NotFound                      404 not_found
    │   ├── LeaseNotFound             404 lease_not_found
    │   ├── ContextNotFound           404 context_not_found
    │   └── QueryNotFound             404 query_not_found
    ├── Conflict                      409 conflict
    │   ├── IdempotencyConflict       409 idempotency_key_reused
    │   └── IllegalTransition         409 illegal_transition
    ├── LeaseEnded                    410 lease_ended
    ├── PayloadTooLarge               413 payload_too_large
    ├── CapacityExhausted             429 capacity_exhausted
    ├── BackendUnavailable            503 backend_unavailable
    └── DatabaseBusy                  503 database_busy

Each message tells the caller what to do next. The API turns them into
``{"error": {"code": ..., "message": ...}}`` in one handler (``service.api.app``).
"""

from __future__ import annotations


class PcleaseError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(PcleaseError):
    status = 400
    code = "bad_request"


class InvalidInput(PcleaseError):
    status = 422
    code = "invalid_input"


class UnknownProfile(InvalidInput):
    code = "unknown_profile"

    def __init__(self, name: str, known: list[str]) -> None:
        choices = ", ".join(sorted(known)) or "(none configured)"
        super().__init__(f"unknown profile {name!r}; configured profiles are: {choices}")


class Unauthorized(PcleaseError):
    status = 401
    code = "unauthorized"


class Forbidden(PcleaseError):
    status = 403
    code = "forbidden"


class NotFound(PcleaseError):
    status = 404
    code = "not_found"


class LeaseNotFound(NotFound):
    code = "lease_not_found"

    def __init__(self, lease_id: str) -> None:
        super().__init__(f"no lease {lease_id!r}; list your leases with GET /v1/leases")


class ContextNotFound(NotFound):
    code = "context_not_found"

    def __init__(self, context_id: str) -> None:
        super().__init__(f"no context {context_id!r}; list contexts with GET /v1/contexts")


class Conflict(PcleaseError):
    status = 409
    code = "conflict"


class IdempotencyConflict(Conflict):
    code = "idempotency_key_reused"


class IllegalTransition(Conflict):
    code = "illegal_transition"


class LeaseEnded(PcleaseError):
    status = 410
    code = "lease_ended"

    def __init__(self, lease_id: str, state: str, reason: str | None) -> None:
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"lease {lease_id} has ended: it is {state}{why}; request a new lease with "
            "POST /v1/leases"
        )
        self.state = state


class PayloadTooLarge(PcleaseError):
    status = 413
    code = "payload_too_large"


class CapacityExhausted(PcleaseError):
    status = 429
    code = "capacity_exhausted"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BackendUnavailable(PcleaseError):
    status = 503
    code = "backend_unavailable"


class QueryNotFound(NotFound):
    code = "query_not_found"

    def __init__(self, query_id: str) -> None:
        super().__init__(
            f"no query {query_id!r}; list a lease's queries with GET "
            "/v1/leases/{lease_id}/queries"
        )


class PlanRefused(InvalidInput):
    """A plan the service will not run (bad bytes, Python UDFs, another Polars version)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class DatabaseBusy(PcleaseError):
    """A write kept losing to concurrent ones (deadlocks, serialization failures) after
    every retry the service makes itself."""

    status = 503
    code = "database_busy"
