"""API tokens: made once, shown once, stored as a SHA-256 hash.

Tokens are 256 random bits, so a fast hash is enough: there is nothing to brute-force.
"""

from __future__ import annotations

import hashlib
import secrets

SCOPES = frozenset({"lease", "read", "admin"})
PREFIX = "pcl_"


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
