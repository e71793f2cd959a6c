"""Polars Cloud access tokens from the service account (OAuth2 client-credentials grant).

:class:`TokenProvider` is blocking and thread-safe: the service calls it from worker
threads, never on the event loop. One lock serialises reads of the source and calls to the
token endpoint, so many threads asking at once cause one request.

Rotation without restart, three ways:

- every ``reread_interval_s`` the next :meth:`TokenProvider.token` re-reads the source;
- :meth:`TokenProvider.invalidate` after the API answered 401: the next ``token()``
  re-reads the source and fetches a new token;
- :meth:`TokenProvider.reload` (``SIGHUP``, see :func:`install_sighup`) re-reads at once.

A changed account drops the cached token; an unchanged one keeps it. When a periodic or
``SIGHUP`` re-read fails, the account read before stays in use (status says so); after an
``invalidate()`` or a refusal by the token endpoint a failed re-read is an error.

Neither the secret nor a token is ever logged, put in an exception message or in
:class:`CredentialStatus`.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import FrameType
from typing import Any

import httpx

from service.clock import Clock, SystemClock
from service.credentials.base import CredentialsError, CredentialSource, ServiceAccount

log = logging.getLogger("pclease.credentials")

#: When the token endpoint sends no ``expires_in`` (OAuth2 only recommends it).
DEFAULT_EXPIRES_IN_S = 300.0
#: A refused account is not sent again for this long, unless the source changes it.
REFUSED_RETRY_S = 30.0
#: After a failed refresh the still-valid token is served and a refresh tried this often.
REFRESH_RETRY_S = 5.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class CredentialStatus:
    """What ``/readyz`` and the dashboard show. Never holds the secret or a token."""

    ok: bool
    source: str
    message: str | None
    token_expires_at: datetime | None
    checked_at: datetime | None


@dataclass
class _Refusal:
    account: ServiceAccount
    message: str
    at: datetime


class TokenProvider:
    """Access tokens for the service account that ``source`` holds."""

    def __init__(
        self,
        source: CredentialSource,
        token_url: str,
        *,
        refresh_margin_s: float = 60.0,
        reread_interval_s: float = 300.0,
        timeout_s: float = 30.0,
        clock: Clock | None = None,
        http: httpx.Client | None = None,
        retry_delays_s: Sequence[float] = (0.5, 2.0),
    ) -> None:
        self.source = source
        self.token_url = token_url
        self._margin = timedelta(seconds=refresh_margin_s)
        self._reread = timedelta(seconds=reread_interval_s)
        self._timeout_s = timeout_s
        self._clock = clock or SystemClock()
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=timeout_s)
        self._retry_delays_s = tuple(retry_delays_s)
        self._lock = threading.Lock()
        self._account: ServiceAccount | None = None
        self._next_read_at: datetime | None = None
        self._must_reread = False
        self._refusal: _Refusal | None = None
        self._token: str | None = None
        self._expires_at: datetime | None = None
        self._refresh_at: datetime | None = None
        self._read_problem: str | None = None
        self._fetch_problem: str | None = None
        self._refresh_problem: str | None = None
        # Replaced whole under the lock, read without it: status() never waits for a fetch.
        self._status = CredentialStatus(
            ok=False,
            source=source.describe(),
            message="not checked yet",
            token_expires_at=None,
            checked_at=None,
        )

    # -- public ------------------------------------------------------------------------
    def token(self) -> str:
        """A valid access token, fetched or refreshed as needed.

        Raises :class:`CredentialsError` when the source cannot be read or the token
        endpoint refuses the account or cannot be reached.
        """
        with self._lock:
            now = self._clock.now()
            if self._account is None or self._must_reread:
                self._read(now)
            elif self._next_read_at is not None and now >= self._next_read_at:
                self._read_keeping_old(now, "periodic re-read")
            if self._token is not None and self._refresh_at is not None and now < self._refresh_at:
                return self._token
            return self._fetch(now)

    def invalidate(self, token: str | None = None) -> None:
        """Drop the cached token after the Polars Cloud API answered 401.

        The next :meth:`token` re-reads the source (so a rotated secret takes effect) and
        fetches a new token. Pass the refused ``token`` to do nothing when another thread
        has already replaced it.
        """
        with self._lock:
            if token is not None and token != self._token:
                return
            self._drop_token()
            self._must_reread = True
            self._update_status(self._clock.now())
            log.info(
                "dropped the Polars Cloud access token; the next request re-reads %s",
                self.source.describe(),
            )

    def reload(self) -> None:
        """Re-read the source now (the ``SIGHUP`` target).

        The cached token is dropped only if the account changed. On failure the account
        read before stays in use, the status says why, and :class:`CredentialsError` is
        raised.
        """
        with self._lock:
            self._read(self._clock.now())

    def status(self) -> CredentialStatus:
        """The last known state; cheap, never blocks and never contacts anything."""
        return self._status

    def check(self) -> CredentialStatus:
        """Get a token if needed (blocking) and return the status; never raises
        :class:`CredentialsError`."""
        with contextlib.suppress(CredentialsError):
            self.token()
        return self._status

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    # -- source ------------------------------------------------------------------------
    def _read(self, now: datetime) -> None:
        self._next_read_at = now + self._reread
        try:
            account = self.source.load()
        except CredentialsError as exc:
            self._read_problem = exc.message
            self._update_status(now)
            raise
        self._must_reread = False
        self._read_problem = None
        if account == self._account:
            log.info("re-read %s: service account unchanged", self.source.describe())
            self._update_status(now)
            return
        if self._account is None:
            log.info(
                "read the Polars Cloud service account %s from %s",
                account.client_id,
                self.source.describe(),
            )
        else:
            log.info(
                "the Polars Cloud service account in %s changed (client id %s); "
                "dropping the cached access token",
                self.source.describe(),
                account.client_id,
            )
            self._drop_token()
        self._account = account
        self._update_status(now)

    def _read_keeping_old(self, now: datetime, why: str) -> None:
        try:
            self._read(now)
        except CredentialsError as exc:
            log.warning(
                "%s failed, still using the service account read before: %s", why, exc.message
            )

    # -- token endpoint ------------------------------------------------------------------
    def _fetch(self, now: datetime) -> str:
        account = self._account
        assert account is not None
        try:
            self._raise_if_refused(account, now)
            access_token, expires_in_s = self._request(account)
        except CredentialsError as exc:
            if self._token is not None and self._expires_at is not None and now < self._expires_at:
                # Refreshing early is a courtesy; the current token still works.
                self._refresh_at = min(self._expires_at, now + timedelta(seconds=REFRESH_RETRY_S))
                self._refresh_problem = (
                    f"refreshing the access token failed: {exc.message}; the current token "
                    f"is valid until {self._expires_at.isoformat(timespec='seconds')}"
                )
                log.warning("%s", self._refresh_problem)
                self._update_status(now)
                return self._token
            self._drop_token()
            self._fetch_problem = exc.message
            self._update_status(now)
            raise
        lifetime = timedelta(seconds=expires_in_s)
        # Short-lived tokens would otherwise be refreshed on every call.
        margin = min(self._margin, lifetime / 2)
        self._token = access_token
        self._expires_at = now + lifetime
        self._refresh_at = self._expires_at - margin
        self._refusal = None
        self._fetch_problem = None
        self._refresh_problem = None
        log.info(
            "fetched a Polars Cloud access token for %s, valid until %s",
            account.client_id,
            self._expires_at.isoformat(timespec="seconds"),
        )
        self._update_status(now)
        return access_token

    def _raise_if_refused(self, account: ServiceAccount, now: datetime) -> None:
        refusal = self._refusal
        if refusal is None or refusal.account != account:
            return
        if now < refusal.at + timedelta(seconds=REFUSED_RETRY_S):
            self._must_reread = True
            raise CredentialsError(refusal.message)
        self._refusal = None

    def _request(self, account: ServiceAccount) -> tuple[str, float]:
        secret = account.client_secret.get_secret_value()
        form = {
            "grant_type": "client_credentials",
            "client_id": account.client_id,
            "client_secret": secret,
        }
        problem = ""
        for attempt in range(len(self._retry_delays_s) + 1):
            if attempt:
                time.sleep(self._retry_delays_s[attempt - 1])
            try:
                response = self._http.post(
                    self.token_url,
                    data=form,
                    headers={"Accept": "application/json"},
                    timeout=self._timeout_s,
                )
            except httpx.TransportError as exc:
                problem = _scrub(f"{type(exc).__name__}: {exc}", secret)
                continue
            if response.status_code in _TRANSIENT_STATUS:
                problem = f"HTTP {response.status_code}"
                continue
            if response.status_code == 200:
                return self._parse_token(response)
            self._refusal_from(account, response, secret)
        raise CredentialsError(
            f"could not reach the Polars Cloud token endpoint {self.token_url}: {problem} "
            f"(tried {len(self._retry_delays_s) + 1} times); check the network and "
            "polars_cloud.token_url"
        )

    def _refusal_from(self, account: ServiceAccount, response: httpx.Response, secret: str) -> None:
        body = _json(response)
        code = str(body.get("error") or f"HTTP {response.status_code}")
        description = body.get("error_description")
        detail = _scrub(code, secret)[:100]
        if isinstance(description, str) and description:
            detail += f" ({_scrub(description, secret)[:200]})"
        message = (
            f"the Polars Cloud token endpoint rejected the service account from "
            f"{self.source.describe()}: {detail}; fix the credentials there"
        )
        self._refusal = _Refusal(account, message, self._clock.now())
        # The source may have been rotated since it was read: read it again next time.
        self._must_reread = True
        log.warning("%s", message)
        raise CredentialsError(message)

    def _parse_token(self, response: httpx.Response) -> tuple[str, float]:
        body = _json(response)
        access_token = body.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise CredentialsError(
                f"the Polars Cloud token endpoint {self.token_url} answered 200 without an "
                "access_token; check polars_cloud.token_url"
            )
        expires_in = body.get("expires_in")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool):
            return access_token, max(float(expires_in), 1.0)
        return access_token, DEFAULT_EXPIRES_IN_S

    # -- state -------------------------------------------------------------------------
    def _drop_token(self) -> None:
        self._token = None
        self._expires_at = None
        self._refresh_at = None

    def _update_status(self, now: datetime) -> None:
        # The account read before stays usable after a failed periodic or SIGHUP re-read,
        # not after invalidate() or a refusal, which demand a fresh read.
        usable = self._account is not None and not self._must_reread
        problems: list[str] = []
        if self._read_problem is not None:
            kept = " (still using the service account read before)" if usable else ""
            problems.append(self._read_problem + kept)
        if self._fetch_problem is not None:
            problems.append(self._fetch_problem)
        if self._refresh_problem is not None and self._token is not None:
            problems.append(self._refresh_problem)
        # ok: a token can be handed out now, or nothing stands in the way of fetching one.
        has_token = self._expires_at is not None and now < self._expires_at
        ok = has_token or (
            self._account is not None
            and self._fetch_problem is None
            and (self._read_problem is None or usable)
        )
        self._status = CredentialStatus(
            ok=ok,
            source=self.source.describe(),
            message="; ".join(problems) or None,
            token_expires_at=self._expires_at,
            checked_at=now,
        )


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _scrub(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def install_sighup(provider: TokenProvider) -> Callable[[], None]:
    """Make ``SIGHUP`` re-read the service account; returns a function that undoes it.

    Call from the main thread (Python only lets it set signal handlers). The handler only
    starts a thread: reading a secret manager is blocking I/O that must neither run on the
    event loop nor wait for the provider's lock inside a signal handler. Failures are
    logged; the account read before stays in use.
    """

    def reload_in_thread() -> None:
        try:
            provider.reload()
        except CredentialsError as exc:
            log.error("SIGHUP: re-reading the service account failed: %s", exc.message)
        except Exception:
            log.exception("SIGHUP: re-reading the service account failed")

    def on_sighup(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=reload_in_thread, name="pclease-sighup", daemon=True).start()

    previous = signal.signal(signal.SIGHUP, on_sighup)

    def uninstall() -> None:
        signal.signal(signal.SIGHUP, previous)

    return uninstall
