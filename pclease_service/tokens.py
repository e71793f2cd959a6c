"""API tokens: made once, shown once, stored as a SHA-256 hash.

Tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force.
A token provisioned from a secret manager (``pclease token create --value-from-env``) must
be as hard to guess, so :func:`check_provided` asks for at least as many characters as a
generated one has, in the bearer-token alphabet of RFC 6750.
"""

from __future__ import annotations

import hashlib
import re
import secrets

SCOPES = frozenset({"lease", "read", "admin"})
PREFIX = "pcl_"
PROVIDED_MIN_CHARS = 32
PROVIDED_MAX_CHARS = 512
# A random value of 32+ characters has far more; "changeme" repeated has 7.
_PROVIDED_MIN_DISTINCT = 8
# RFC 6750's b64token: safe in an Authorization header, a JSON string and a connection URI
# password once URL-encoded.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_scopes(scopes: list[str]) -> frozenset[str]:
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ValueError(
            f"unknown scope(s) {', '.join(sorted(unknown))}; choose from "
            f"{', '.join(sorted(SCOPES))}"
        )
    if not scopes:
        raise ValueError("give at least one --scope: lease, read or admin")
    return frozenset(scopes)


def check_provided(value: str) -> str:
    """A token value given by the operator, or ValueError saying what is wrong with it.
    The message never contains the value or any part of it."""
    if not PROVIDED_MIN_CHARS <= len(value) <= PROVIDED_MAX_CHARS:
        raise ValueError(
            f"the token value has {len(value)} characters; it needs "
            f"{PROVIDED_MIN_CHARS} to {PROVIDED_MAX_CHARS} (make one with `python -c "
            "'import secrets; print(secrets.token_urlsafe(32))'` or `openssl rand -hex 32`)"
        )
    if not _B64TOKEN.fullmatch(value):
        allowed = _B64TOKEN.pattern
        bad = next((i for i, ch in enumerate(value) if not re.fullmatch(allowed, ch)), None)
        where = f" (the first other character is at position {bad + 1})" if bad is not None else ""
        raise ValueError(
            "the token value may only contain letters, digits and - . _ ~ + /, optionally "
            f"followed by = padding{where}"
        )
    if len(set(value)) < _PROVIDED_MIN_DISTINCT:
        raise ValueError(
            f"the token value uses fewer than {_PROVIDED_MIN_DISTINCT} different characters, "
            "so it looks like a placeholder; use a random value"
        )
    return value
