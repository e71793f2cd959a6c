"""Dashboard sign-in: signed session cookies and CSRF tokens.

A person signs in by pasting a pclease token once. The cookie then holds only the token's
*id*, a random session nonce and an expiry, signed with HMAC-SHA256: never the token or
its hash. Each request looks the token up again (cached for ``token_cache_s``), so a
revoked token ends its sessions within that time.

CSRF: every form carries ``HMAC(secret, "csrf:" + nonce)``; the sign-in form, which has no
session yet, uses a double-submit cookie. Cookies are HttpOnly, SameSite=Lax (so the
Airflow extra link, a cross-site GET, arrives signed in, while cross-site POSTs carry no
cookie) and Secure when the request came over https.

The signing key is ``session_secret`` or, if unset, 32 random bytes made once and kept in
the database (``service_keys``), so sessions survive a restart and every replica of a
deployment accepts the cookies the others issued. Whoever can read the database can then
sign cookies: set ``session_secret`` (from a secret store) to keep the key out of it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

SESSION_COOKIE = "pclease_session"
LOGIN_COOKIE = "pclease_login"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Session:
    token_id: str
    nonce: str
    expires_at: float


class SessionSigner:
    """Signs and reads session cookies. ``secret`` may be a function, called once on first
    use: the service reads its shared key from the database only when it starts."""

    def __init__(self, secret: bytes | Callable[[], bytes], ttl_s: float) -> None:
        self._secret = secret
        self._keys: tuple[bytes, bytes] | None = None
        self.ttl_s = ttl_s

    def _derived(self) -> tuple[bytes, bytes]:
        if self._keys is None:
            secret = self._secret() if callable(self._secret) else self._secret
            # Separate keys per purpose, so a signature made for one can never pass as
            # another.
            self._keys = (
                hmac.new(secret, b"pclease session", hashlib.sha256).digest(),
                hmac.new(secret, b"pclease csrf", hashlib.sha256).digest(),
            )
        return self._keys

    @property
    def _session_key(self) -> bytes:
        return self._derived()[0]

    @property
    def _csrf_key(self) -> bytes:
        return self._derived()[1]

    def _sign(self, payload: bytes) -> str:
        return _b64(hmac.new(self._session_key, payload, hashlib.sha256).digest())

    def issue(self, token_id: str) -> tuple[str, Session]:
        session = Session(token_id, secrets.token_urlsafe(16), float(int(time.time() + self.ttl_s)))
        payload = json.dumps(
            {"t": session.token_id, "n": session.nonce, "e": int(session.expires_at)},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(payload)}.{self._sign(payload)}", session

    def read(self, cookie: str | None) -> Session | None:
        """The session in a cookie, or None if it is missing, forged, malformed or old."""
        if not cookie or len(cookie) > 1024 or cookie.count(".") != 1:
            return None
        body, signature = cookie.split(".")
        try:
            payload = _unb64(body)
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(payload), signature):
            return None
        try:
            data = json.loads(payload)
            session = Session(str(data["t"]), str(data["n"]), float(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.expires_at < time.time():
            return None
        return session

    def csrf_token(self, session: Session) -> str:
        message = f"csrf:{session.nonce}".encode()
        return _b64(hmac.new(self._csrf_key, message, hashlib.sha256).digest())

    def check_csrf(self, session: Session, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(self.csrf_token(session), value or "")


def new_login_nonce() -> str:
    return secrets.token_urlsafe(24)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: only paths of this dashboard, never another site."""
    if (
        target
        and target.startswith("/ui/")
        and not target.startswith("//")
        and "\\" not in target
        and len(target) <= 2000
        and all(31 < ord(ch) < 127 for ch in target)
    ):
        return target
    return "/ui/"
