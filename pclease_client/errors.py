"""Everything the client raises on purpose, in one tree.

::

    PcleaseClientError                the root
    ├── ApiError                      the service answered with an error: status, code, message
    │   ├── BadRequest                400 bad_request
    │   ├── Unauthorized              401 unauthorized
    │   ├── Forbidden                 403 forbidden
    │   ├── NotFound                  404 not_found
    │   │   ├── LeaseNotFound         404 lease_not_found
    │   │   ├── ContextNotFound       404 context_not_found
    │   │   └── QueryNotFound         404 query_not_found
    │   ├── Conflict                  409 conflict
    │   │   ├── IdempotencyConflict   409 idempotency_key_reused
    │   │   └── IllegalTransition     409 illegal_transition
    │   ├── LeaseEnded                410 lease_ended
    │   ├── PayloadTooLarge           413 payload_too_large
    │   ├── InvalidInput              422 invalid_input
    │   │   ├── UnknownProfile        422 unknown_profile
    │   │   └── PlanRefused           422 PlanRefusal: plan_invalid | plan_version_mismatch |
    │   │                                 python_udf_refused | plan_refused
    │   ├── CapacityExhausted         429 capacity_exhausted (retry_after_s)
    │   ├── InternalError             500 internal_error (the message names an incident id)
    │   └── ServiceUnavailable        503, or 502/504 from a proxy in front of the service
    │       ├── BackendUnavailable    503 backend_unavailable
    │       ├── DatabaseBusy          503 database_busy
    │       └── StorageUnavailable    503 storage_unavailable
    ├── RequestFailed                 no answer at all: refused, timed out, dropped
    ├── UnexpectedResponse            an answer not in the API's shape (a proxy's page)
    ├── LeaseLost                     the lease ended underneath its holder: state and reason
    ├── LeaseClosed                   this process let the lease go (closed its handle)
    └── QueryFailed                   a query failed or was cancelled: Polars' error type

An error answer becomes the class of its ``code`` (the service's stable codes, listed in
``docs/api.md``); a code this client does not know becomes the class of its status, so a
newer service's new codes still land on the right branch. Branch on the class or on
``code``, never on ``message``: the message is for people and says what to do next.
Transient answers (502, 503, 504) and lost connections are retried before they are raised.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

from pclease_client.states import LeaseState, QueryState

if TYPE_CHECKING:
    from pclease_client.models import LeaseInfo, QueryInfo


class PcleaseClientError(Exception):
    """Root of everything the client raises on purpose."""


class ApiError(PcleaseClientError):
    """The service answered ``status`` with ``{"error": {"code", "message"}}``."""

    status: int = 0
    code: str = "http_error"

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class LeaseNotFound(NotFound):
    code = "lease_not_found"


class ContextNotFound(NotFound):
    code = "context_not_found"


class QueryNotFound(NotFound):
    code = "query_not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class IdempotencyConflict(Conflict):
    code = "idempotency_key_reused"


class IllegalTransition(Conflict):
    code = "illegal_transition"


class LeaseEnded(ApiError):
    """A heartbeat or a query on a lease that has ended; the message says how it ended."""

    status, code = 410, "lease_ended"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class InvalidInput(ApiError):
    status, code = 422, "invalid_input"


class UnknownProfile(InvalidInput):
    code = "unknown_profile"


class PlanRefusal(StrEnum):
    """Why the service refused a plan (the value is the error code)."""

    INVALID = "plan_invalid"
    VERSION_MISMATCH = "plan_version_mismatch"
    PYTHON_UDF = "python_udf_refused"
    REFUSED = "plan_refused"


class PlanRefused(InvalidInput):
    """A plan the service will not run; :attr:`refusal` says why."""

    code = "plan_refused"

    @property
    def refusal(self) -> PlanRefusal:
        return PlanRefusal(self.code)


class CapacityExhausted(ApiError):
    """The profile is at capacity: retry after :attr:`retry_after_s` (or lease with a
    ``wait_s`` to queue for a slot instead)."""

    status, code = 429, "capacity_exhausted"

    def __init__(
        self, status: int, code: str, message: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.retry_after_s = retry_after_s


class InternalError(ApiError):
    status, code = 500, "internal_error"


class ServiceUnavailable(ApiError):
    status, code = 503, "service_unavailable"


class BackendUnavailable(ServiceUnavailable):
    code = "backend_unavailable"


class DatabaseBusy(ServiceUnavailable):
    code = "database_busy"


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class RequestFailed(PcleaseClientError):
    """The request got no answer (connection refused or dropped, a timeout), after the
    client's retries; ``__cause__`` is httpx's error."""

    def __init__(self, method: str, url: str, reason: str) -> None:
        super().__init__(f"{method} {url}: no answer from pclease ({reason})")
        self.method = method
        self.url = url


class UnexpectedResponse(PcleaseClientError):
    """An answer this client cannot read: not the API's JSON (a proxy's error page), or a
    field it does not know (a service newer than this client)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"unexpected answer ({status}) from pclease: {message}")
        self.status = status


class LeaseLost(PcleaseClientError):
    """The lease ended underneath its holder (expired, revoked, failed, released by someone
    else) or never became active. ``state`` is None when the service could not say."""

    def __init__(
        self,
        lease_id: str,
        state: LeaseState | None,
        reason: str | None,
        *,
        message: str | None = None,
    ) -> None:
        shown = state.value if state is not None else "ended"
        super().__init__(
            message
            or f"lease {lease_id} ended underneath this task: {shown}"
            + (f" ({reason})" if reason else "")
        )
        self.lease_id = lease_id
        self.state = state
        self.reason = reason

    @classmethod
    def of(cls, lease: LeaseInfo) -> LeaseLost:
        """The lease as it ended."""
        return cls(lease.id, lease.state, lease.end_reason)


class LeaseClosed(PcleaseClientError):
    """A lease handle used after this process let the lease go (``Lease.close()``, the
    end of ``client.lease()``, a release on kill): nothing more runs on it."""

    def __init__(self, lease_id: str, doing: str, why: str = "") -> None:
        super().__init__(
            f"lease {lease_id} was let go by this process"
            + (f" ({why})" if why else "")
            + f": cannot {doing}; take a new lease for more work"
        )
        self.lease_id = lease_id


class QueryFailed(PcleaseClientError):
    """A query ended without succeeding. ``error_type`` is Polars' exception class
    (``ColumnNotFoundError``...) or one of pclease's (``PlanRefused``, ``QueryTimeout``,
    ``Cancelled``...); ``query`` is the query as it ended, when the service said."""

    def __init__(
        self,
        query_id: str,
        error_type: str,
        message: str,
        *,
        state: QueryState | None = None,
        query: QueryInfo | None = None,
    ) -> None:
        super().__init__(f"query {query_id} failed: {error_type}: {message}")
        self.query_id = query_id
        self.error_type = error_type
        self.message = message
        self.state = state
        self.query = query

    @classmethod
    def of(cls, query: QueryInfo) -> QueryFailed:
        """A query that ended without succeeding, as the service reported it."""
        error_type = query.error.type if query.error else query.state.value
        message = query.error.message if query.error else ""
        return cls(query.id, error_type, message, state=query.state, query=query)

    def as_polars_error(self) -> Exception:
        """The matching ``polars.exceptions`` error if there is one, else this error."""
        try:
            import polars.exceptions as pe
        except ImportError:
            return self
        cls = getattr(pe, self.error_type, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls(self.message)
        return self


def _codes(*classes: type[ApiError]) -> dict[str, type[ApiError]]:
    return {cls.code: cls for cls in classes}


_BY_CODE: dict[str, type[ApiError]] = {
    **_codes(
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        LeaseNotFound,
        ContextNotFound,
        QueryNotFound,
        Conflict,
        IdempotencyConflict,
        IllegalTransition,
        LeaseEnded,
        PayloadTooLarge,
        InvalidInput,
        UnknownProfile,
        CapacityExhausted,
        InternalError,
        BackendUnavailable,
        DatabaseBusy,
        StorageUnavailable,
    ),
    **{refusal.value: PlanRefused for refusal in PlanRefusal},
}
_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: LeaseEnded,
    413: PayloadTooLarge,
    422: InvalidInput,
    429: CapacityExhausted,
    500: InternalError,
    502: ServiceUnavailable,
    503: ServiceUnavailable,
    504: ServiceUnavailable,
}
#: The classes a code may take, for the documentation and the tests.
ERROR_CODES: Mapping[str, type[ApiError]] = _BY_CODE


def api_error(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> ApiError:
    """The exception for an error answer: by its code, else by its status."""
    cls = _BY_CODE.get(code) or _BY_STATUS.get(status) or ApiError
    if cls is CapacityExhausted:
        return CapacityExhausted(
            status, code, message, retry_after_s=_retry_after((headers or {}).get("retry-after"))
        )
    return cls(status, code, message)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: the service never sends one
        return None
