"""The fake's OAuth2 side: client-credentials grants and the bearer tokens it issued."""

from __future__ import annotations

import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote_plus


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Grant:
    access_token: str
    expires_in: int


class TokenAuthority:
    """Issues unsigned JWTs for one client and remembers which ones are still honoured."""

    def __init__(self, client_id: str, client_secret: str, ttl_s: int) -> None:
        self._lock = threading.Lock()
        self._client_id = client_id
        self._client_secret = client_secret
        self.ttl_s = ttl_s
        self._live: dict[str, float] = {}  # jti -> exp
        self.issued = 0
        # One service-account user per client id, as Keycloak does.
        self._subjects: dict[str, str] = {}

    def rotate(self, client_secret: str, client_id: str | None = None) -> None:
        with self._lock:
            self._client_secret = client_secret
            if client_id is not None:
                self._client_id = client_id

    def revoke_all(self) -> None:
        with self._lock:
            self._live.clear()

    def subject_for(self, client_id: str) -> str:
        with self._lock:
            return self._subjects.setdefault(client_id, str(uuid.uuid4()))

    def mint(self) -> Grant:
        """A token for the current client, as if it had just authenticated."""
        with self._lock:
            client_id, client_secret = self._client_id, self._client_secret
        grant = self.grant(client_id, client_secret)
        assert grant is not None
        return grant

    def grant(self, client_id: str, client_secret: str) -> Grant | None:
        with self._lock:
            if (client_id, client_secret) != (self._client_id, self._client_secret):
                return None
            sub = self._subjects.setdefault(client_id, str(uuid.uuid4()))
            now = int(time.time())
            exp = now + self.ttl_s
            jti = str(uuid.uuid4())
            payload = {
                "exp": exp,
                "iat": now,
                "jti": jti,
                "iss": "fakepc",
                "sub": sub,
                "azp": client_id,
                "typ": "Bearer",
            }
            header = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
            body = _b64url(json.dumps(payload).encode())
            self._live[jti] = exp
            self.issued += 1
        return Grant(access_token=f"{header}.{body}.", expires_in=self.ttl_s)

    def verify(self, bearer: str | None) -> dict[str, object] | None:
        """The token's claims if this authority issued it and still honours it, else None."""
        if not bearer:
            return None
        parts = bearer.split(".")
        if len(parts) != 3:
            return None
        try:
            claims = json.loads(_b64url_decode(parts[1]))
        except (ValueError, binascii.Error):
            return None
        if not isinstance(claims, dict):
            return None
        jti = claims.get("jti")
        with self._lock:
            exp = self._live.get(jti) if isinstance(jti, str) else None
        if exp is None or exp <= time.time():
            return None
        return claims


def bearer_of(authorization: str | None) -> str | None:
    if authorization is None:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def client_credentials(
    body: bytes, authorization: str | None
) -> tuple[str | None, str | None, str | None]:
    """``(grant_type, client_id, client_secret)`` from a form body and/or HTTP Basic auth.

    RFC 6749 2.3.1: Basic credentials are form-urlencoded before base64.
    """
    form = parse_qs(body.decode("latin-1"), keep_blank_values=True)
    grant_type = form.get("grant_type", [None])[0]
    client_id = form.get("client_id", [None])[0]
    client_secret = form.get("client_secret", [None])[0]
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (ValueError, binascii.Error):
                return grant_type, None, None
            user, sep, password = decoded.partition(":")
            if sep:
                client_id, client_secret = unquote_plus(user), unquote_plus(password)
    return grant_type, client_id, client_secret
