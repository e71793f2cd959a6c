"""The service account from two environment variables.

A running process's environment never changes, so the variables are read once, when the
source is made; the polars_cloud backend then removes them from ``os.environ`` so that
neither the polars-cloud client nor a child process can see them. Rotating a secret kept
in the environment therefore needs a restart; the ``file`` and ``aws_secrets_manager``
sources follow rotation without one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Self

from pydantic import SecretStr

from pclease_service.config import CredentialsSettings
from pclease_service.credentials.base import CredentialsError, CredentialSource, ServiceAccount


class EnvSource(CredentialSource):
    """Reads ``os.environ`` (or the given mapping) once, when made."""

    name = "env"

    def __init__(
        self,
        client_id_env: str = "POLARS_CLOUD_CLIENT_ID",
        client_secret_env: str = "POLARS_CLOUD_CLIENT_SECRET",  # noqa: S107 (a variable name)
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.client_id_env = client_id_env
        self.client_secret_env = client_secret_env
        environ = os.environ if environ is None else environ
        self._client_id = environ.get(client_id_env, "").strip()
        self._client_secret = SecretStr(environ.get(client_secret_env, "").strip())

    @classmethod
    def from_settings(cls, settings: CredentialsSettings) -> Self:
        return cls(settings.client_id_env, settings.client_secret_env)

    @property
    def variables(self) -> tuple[str, str]:
        """The names of the two variables it read."""
        return self.client_id_env, self.client_secret_env

    def describe(self) -> str:
        return f"environment variables {self.client_id_env} and {self.client_secret_env}"

    def load(self) -> ServiceAccount:
        client_id = self._client_id
        client_secret = self._client_secret.get_secret_value()
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
                f"{'was' if len(missing) == 1 else 'were'} unset or empty when the service "
                f"started; set {self.client_id_env} and {self.client_secret_env} to the "
                "Polars Cloud service account's client id and secret in the service's "
                "environment and restart it"
            )
        return ServiceAccount.of(client_id, client_secret)
