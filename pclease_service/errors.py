"""Every error pclease raises on purpose, in one tree.

::

    PcleaseException                      the root
    ├── PcleaseError                      answered over HTTP as {"error": {"code", "message"}}
    │   ├── BadRequest                    400 bad_request
    │   ├── InvalidInput                  422 invalid_input
    │   │   ├── UnknownProfile            422 unknown_profile
    │   │   └── PlanRefused               422 PlanRefusal: plan_invalid | python_udf_refused |
    │   │                                     plan_version_mismatch | plan_refused
    │   ├── Unauthorized                  401 unauthorized
    │   ├── Forbidden                     403 forbidden
    │   ├── NotFound                      404 not_found
    │   │   ├── LeaseNotFound             404 lease_not_found
    │   │   ├── ContextNotFound           404 context_not_found
    │   │   └── QueryNotFound             404 query_not_found
    │   ├── Conflict                      409 conflict
    │   │   ├── IdempotencyConflict       409 idempotency_key_reused
    │   │   └── IllegalTransition         409 illegal_transition
    │   ├── LeaseEnded                    410 lease_ended
    │   ├── PayloadTooLarge               413 payload_too_large
    │   ├── CapacityExhausted             429 capacity_exhausted (Retry-After)
    │   ├── BackendUnavailable            503 backend_unavailable
    │   ├── DatabaseBusy                  503 database_busy
    │   └── StorageUnavailable            503 storage_unavailable
    ├── BackendError                      a backend call failed (the reconciler retries or
    │                                     fails the context; never reaches a client as is)
    ├── CredentialsError                  the Polars Cloud service account cannot be read or
    │                                     was refused
    └── PageError                         a dashboard page: status, title and advice
        └── SignInRequired                401 page: sign in (again)

Each message tells the caller what to do next and is safe to show: none carries a secret.
``PcleaseError`` becomes JSON in one handler (:mod:`pclease_service.api.errors`), dashboard
page errors become HTML pages in the dashboard's. A refused plan says why as a
:class:`PlanRefusal` code, never through its message's wording.
"""

from __future__ import annotations

from enum import StrEnum


class PcleaseException(Exception):
    """Root of everything pclease raises on purpose; ``message`` is safe to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PcleaseError(PcleaseException):
    """An error the API answers with ``status`` and ``{"error": {"code", "message"}}``."""

    status = 500
    code = "internal_error"


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


class PlanRefusal(StrEnum):
    """Why a plan cannot run. The value is the API's error code."""

    #: Not a complete plan as Polars writes it (bad header, truncated, malformed).
    INVALID = "plan_invalid"
    #: Built by a Polars whose plans the context's Polars cannot read.
    VERSION_MISMATCH = "plan_version_mismatch"
    #: Carries the marker of pickled Python functions, on a profile that refuses them.
    PYTHON_UDF = "python_udf_refused"
    #: Anything else the guard refuses: a path outside the data roots, a bare pickle, a
    #: native plugin, a shape it cannot read.
    REFUSED = "plan_refused"

    @property
    def error_type(self) -> str:
        """The name a query outcome reports (``QueryOutcome.error_type``)."""
        return _ERROR_TYPES[self]


_ERROR_TYPES = {
    PlanRefusal.INVALID: "PlanInvalid",
    PlanRefusal.VERSION_MISMATCH: "PlanVersionMismatch",
    PlanRefusal.PYTHON_UDF: "PlanRefused",
    PlanRefusal.REFUSED: "PlanRefused",
}


class PlanRefused(InvalidInput):
    """A plan the service will not run; ``refusal`` says why."""

    def __init__(self, refusal: PlanRefusal, message: str) -> None:
        super().__init__(message)
        self.refusal = refusal
        self.code = refusal.value

    @property
    def error_type(self) -> str:
        return self.refusal.error_type


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


class QueryNotFound(NotFound):
    code = "query_not_found"

    def __init__(self, query_id: str) -> None:
        super().__init__(
            f"no query {query_id!r}; list a lease's queries with GET "
            "/v1/leases/{lease_id}/queries"
        )


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


class DatabaseBusy(PcleaseError):
    """A write kept losing to concurrent ones (deadlocks, serialization failures) after
    every retry the service makes itself."""

    status = 503
    code = "database_busy"


class StorageUnavailable(PcleaseError):
    """The storage of query plans and results (``storage`` in the config) failed."""

    status = 503
    code = "storage_unavailable"


class BackendError(PcleaseException):
    """A backend call failed; the message is safe to show to users."""


class CredentialsError(PcleaseException):
    """The service account cannot be read or was refused.

    The message names the source and what to fix, never the secret.
    """


class PageError(PcleaseException):
    """A dashboard page that cannot be shown: an HTML page with this status, title and
    advice (JSON for the dashboard's own fetches)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.title = title


class SignInRequired(PageError):
    """The dashboard needs a (new) sign-in: pages redirect to the sign-in form."""

    def __init__(self, message: str) -> None:
        super().__init__(401, "Sign in", message)
