"""The service account from two environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self

from service.config import CredentialsSettings
from service.credentials.base import CredentialsError, CredentialSource, ServiceAccount


class EnvSource(CredentialSource):
    """Reads ``os.environ`` (or the given mapping) on every :meth:`load`."""

    name = "env"

    def __init__(
        self,
        client_id_env: str = "POLARS_CLOUD_CLIENT_ID",
        client_secret_env: str = "POLARS_CLOUD_CLIENT_SECRET",  # noqa: S107 (a variable name)
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.client_id_env = client_id_env
        self.client_secret_env = client_secret_env
        self._environ = environ

    @classmethod
    def from_settings(cls, settings: CredentialsSettings) -> Self:
        return cls(settings.client_id_env, settings.client_secret_env)

    def describe(self) -> str:
        return f"environment variables {self.client_id_env} and {self.client_secret_env}"

    def load(self) -> ServiceAccount:
        environ = os.environ if self._environ is None else self._environ
        client_id = environ.get(self.client_id_env, "").strip()
        client_secret = environ.get(self.client_secret_env, "").strip()
        missing = [
            name
            for name, value in (
                (self.client_id_env, client_id),
                (self.client_secret_env, client_secret),
            )
            if not value
        ]
        if missing:
            raise CredentialsError(
                f"environment variable {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} unset or empty; set "
                f"{self.client_id_env} and {self.client_secret_env} to the Polars Cloud "
                "service account's client id and secret in the service's environment"
            )
        return ServiceAccount.of(client_id, client_secret)
