"""Client-side errors.

::

    PcleaseClientError
    ├── PcleaseHTTPError   the service answered with an error (code, message, status)
    ├── LeaseLost          the lease ended underneath the caller (expired, revoked, failed)
    └── QueryFailed        a query failed or was cancelled; carries Polars' error type
"""

from __future__ import annotations


class PcleaseClientError(Exception):
    pass


class PcleaseHTTPError(PcleaseClientError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class LeaseLost(PcleaseClientError):
    def __init__(self, lease_id: str, state: str, reason: str | None) -> None:
        super().__init__(
            f"lease {lease_id} ended underneath this task: {state}"
            + (f" ({reason})" if reason else "")
        )
        self.lease_id = lease_id
        self.state = state
        self.reason = reason


class QueryFailed(PcleaseClientError):
    def __init__(self, query_id: str, error_type: str, message: str) -> None:
        super().__init__(f"query {query_id} failed: {error_type}: {message}")
        self.query_id = query_id
        self.error_type = error_type
        self.message = message

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
