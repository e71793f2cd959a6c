"""What every credential source provides, and the error they all raise.

A source turns some place a secret lives (environment, mounted files, a secret manager)
into a :class:`ServiceAccount`. It must provide exactly:

``name``
    A short class attribute, the :class:`~service.config.CredentialSourceKind` value.

``describe() -> str``
    Where it reads from, in words an operator can act on ("files /run/secrets/id and
    /run/secrets/secret"). Shown in logs, errors, ``/readyz`` and the dashboard, so it
    must never contain the secret.

``load() -> ServiceAccount``
    Read the account now (blocking; the caller runs it in a thread). Every call reads
    the source afresh, which is how rotation is picked up. Failures raise
    :class:`CredentialsError` with a message that names the source and what to fix,
    never the secret itself.

``from_settings(settings) -> Self``
    Build the source from ``polars_cloud.credentials``.

Adding a source (HashiCorp Vault, GCP Secret Manager) is one module with one such class,
a value in ``CredentialSourceKind`` with its settings, and one line in
:data:`service.credentials.registry.SOURCES`.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import ClassVar, Self

from pydantic import SecretStr

from pclease_service.config import CredentialsSettings


@dataclass(frozen=True)
class ServiceAccount:
    """A Polars Cloud service account. Its repr shows the client id only."""

    client_id: str
    client_secret: SecretStr = field(repr=False)

    @classmethod
    def of(cls, client_id: str, client_secret: str) -> ServiceAccount:
        return cls(client_id, SecretStr(client_secret))


class CredentialsError(Exception):
    """The service account cannot be read or was refused.

    The message is safe to show anywhere: it names the source and what to fix, never the
    secret.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CredentialSource(abc.ABC):
    """One place the service account is read from (see the module docstring)."""

    name: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, settings: CredentialsSettings) -> Self: ...

    @abc.abstractmethod
    def describe(self) -> str: ...

    @abc.abstractmethod
    def load(self) -> ServiceAccount: ...

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"
