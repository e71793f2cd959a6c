"""Polars Cloud access tokens from the service account (OAuth2 client-credentials grant).

:class:`TokenProvider` is blocking and thread-safe: the service calls it from worker
threads, never on the event loop. One lock serialises reads of the source and calls to the
token endpoint, so many threads asking at once cause one request.

Rotation without restart, three ways:

- every ``reread_interval_s`` the next :meth:`TokenProvider.token` re-reads the source;
- :meth:`TokenProvider.invalidate` after the API answered 401: the next ``token()``
  re-reads the source and fetches a new token;
- :meth:`TokenProvider.reload` (``SIGHUP``, see :func:`install_sighup`) re-reads at once.

A changed account replaces the cached token only once a token for it has been fetched;
until then (the endpoint is down, or refuses the new account) the account and token read
before stay in use, and the status says why. An unchanged account keeps its token. When a
re-read fails, the account read before stays in use as well (the status says so). Re-reads
that a refusal asks for happen at most every ``FORCED_REREAD_MIN_S``, not on every call.

One fetch (all its attempts and pauses) ends within ``deadline_s``, so a thread holding the
lock never blocks the others for longer than that.

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

from pclease_service.clock import Clock, SystemClock
from pclease_service.credentials.base import CredentialsError, CredentialSource, ServiceAccount

log = logging.getLogger("pclease.credentials")

#: When the token endpoint sends no ``expires_in`` (OAuth2 only recommends it).
DEFAULT_EXPIRES_IN_S = 300.0
#: A refused account is not sent again for this long, unless the source changes it.
REFUSED_RETRY_S = 30.0
#: After a failed refresh the still-valid token is served and a refresh tried this often.
REFRESH_RETRY_S = 5.0
#: Re-reads asked for by a refusal or a failed read happen at most this often.
FORCED_REREAD_MIN_S = 5.0
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
        deadline_s: float = 20.0,
        clock: Clock | None = None,
        http: httpx.Client | None = None,
        retry_delays_s: Sequence[float] = (0.5, 2.0),
    ) -> None:
        self.source = source
        self.token_url = token_url
        self._margin = timedelta(seconds=refresh_margin_s)
        self._reread = timedelta(seconds=reread_interval_s)
        self._timeout_s = timeout_s
        self._deadline_s = deadline_s
        self._clock = clock or SystemClock()
        self._own_http = http is None
        self._http = http or httpx.Client(timeout=timeout_s)
        self._retry_delays_s = tuple(retry_delays_s)
        self._lock = threading.Lock()
        self._account: ServiceAccount | None = None
        self._next_read_at: datetime | None = None
        self._must_reread = False
        self._reread_not_before: datetime | None = None
        self._last_read_at: datetime | None = None
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
            if self._account is None:
                self._read(now)  # nothing read before to fall back on: a failure raises
            elif self._must_reread:
                if self._reread_not_before is None or now >= self._reread_not_before:
                    self._read_keeping_old(now, "re-reading the service account")
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
            self._reread_not_before = None
            self._update_status(self._clock.now())
            log.info(
                "dropped the Polars Cloud access token; the next request re-reads %s",
                self.source.describe(),
            )

    def reload(self) -> None:
        """Re-read the source now (the ``SIGHUP`` target).

        The cached token is replaced only if the account changed and a token for the new
        one could be fetched. On failure the account read before stays in use, the status
        says why, and :class:`CredentialsError` is raised.
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
        self._last_read_at = now
        try:
            account = self.source.load()
        except CredentialsError as exc:
            self._read_problem = exc.message
            self._reread_not_before = now + timedelta(seconds=FORCED_REREAD_MIN_S)
            self._update_status(now)
            raise
        if account == self._account:
            self._must_reread = False
            self._read_problem = None
            log.info("re-read %s: service account unchanged", self.source.describe())
            self._update_status(now)
            return
        if self._account is None:
            self._must_reread = False
            self._read_problem = None
            log.info(
                "read the Polars Cloud service account %s from %s",
                account.client_id,
                self.source.describe(),
            )
            self._account = account
            self._update_status(now)
            return
        self._switch_to(account, now)

    def _switch_to(self, account: ServiceAccount, now: datetime) -> None:
        """Use the changed ``account`` once it has a token; until then keep the old one."""
        try:
            self._raise_if_refused(account, now)
            access_token, expires_in_s = self._request(account)
        except CredentialsError as exc:
            self._read_problem = (
                f"the service account in {self.source.describe()} changed (client id "
                f"{account.client_id}), but no access token could be fetched for it: "
                f"{exc.message}"
            )
            self._must_reread = True
            self._reread_not_before = now + timedelta(seconds=FORCED_REREAD_MIN_S)
            self._update_status(now)
            raise CredentialsError(self._read_problem) from None
        self._account = account
        self._must_reread = False
        self._read_problem = None
        expires_at = self._install(access_token, expires_in_s, now)
        log.info(
            "the Polars Cloud service account in %s changed (client id %s); now using an "
            "access token for it, valid until %s",
            self.source.describe(),
            account.client_id,
            expires_at.isoformat(timespec="seconds"),
        )
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
        expires_at = self._install(access_token, expires_in_s, now)
        log.info(
            "fetched a Polars Cloud access token for %s, valid until %s",
            account.client_id,
            expires_at.isoformat(timespec="seconds"),
        )
        self._update_status(now)
        return access_token

    def _install(self, access_token: str, expires_in_s: float, now: datetime) -> datetime:
        lifetime = timedelta(seconds=expires_in_s)
        # Short-lived tokens would otherwise be refreshed on every call.
        margin = min(self._margin, lifetime / 2)
        self._token = access_token
        self._expires_at = now + lifetime
        self._refresh_at = self._expires_at - margin
        self._refusal = None
        self._fetch_problem = None
        self._refresh_problem = None
        return self._expires_at

    def _demand_reread(self) -> None:
        """Read the source again (it may have been fixed), but not on every call."""
        self._must_reread = True
        if self._last_read_at is not None:
            self._reread_not_before = self._last_read_at + timedelta(seconds=FORCED_REREAD_MIN_S)

    def _raise_if_refused(self, account: ServiceAccount, now: datetime) -> None:
        refusal = self._refusal
        if refusal is None or refusal.account != account:
            return
        if now < refusal.at + timedelta(seconds=REFUSED_RETRY_S):
            self._demand_reread()
            raise CredentialsError(refusal.message)
        self._refusal = None

    def _request(self, account: ServiceAccount) -> tuple[str, float]:
        secret = account.client_secret.get_secret_value()
        form = {
            "grant_type": "client_credentials",
            "client_id": account.client_id,
            "client_secret": secret,
        }
        problem = "no time left for an attempt"
        deadline = time.monotonic() + self._deadline_s
        tried = 0
        for attempt in range(len(self._retry_delays_s) + 1):
            if attempt:
                delay = self._retry_delays_s[attempt - 1]
                if time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            tried += 1
            try:
                response = self._http.post(
                    self.token_url,
                    data=form,
                    headers={"Accept": "application/json"},
                    timeout=min(self._timeout_s, remaining),
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
            f"(tried {tried} time{'s' if tried != 1 else ''} within {self._deadline_s:g} s); "
            "check the network and polars_cloud.token_url"
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
        # The source may have been rotated since it was read: read it again soon.
        self._demand_reread()
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
        # The account read before stays usable after any failed re-read.
        usable = self._account is not None
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
