"""The service account from two files, such as mounted Kubernetes or Docker secrets."""

from __future__ import annotations

from pathlib import Path
from typing import Self

from pclease_service.config import CredentialsSettings
from pclease_service.credentials.base import CredentialsError, CredentialSource, ServiceAccount


class FileSource(CredentialSource):
    """Reads both files on every :meth:`load`; surrounding whitespace (the trailing newline
    most secret tooling writes) is ignored."""

    name = "file"

    def __init__(self, client_id_file: Path, client_secret_file: Path) -> None:
        self.client_id_file = Path(client_id_file)
        self.client_secret_file = Path(client_secret_file)

    @classmethod
    def from_settings(cls, settings: CredentialsSettings) -> Self:
        if settings.client_id_file is None or settings.client_secret_file is None:
            raise CredentialsError(
                "the file credential source needs polars_cloud.credentials.client_id_file "
                "and client_secret_file"
            )
        return cls(settings.client_id_file, settings.client_secret_file)

    def describe(self) -> str:
        return f"files {self.client_id_file} and {self.client_secret_file}"

    def load(self) -> ServiceAccount:
        client_id = self._read(self.client_id_file, "client_id_file", "client id")
        client_secret = self._read(self.client_secret_file, "client_secret_file", "client secret")
        return ServiceAccount.of(client_id, client_secret)

    @staticmethod
    def _read(path: Path, key: str, what: str) -> str:
        fix = f"mount the {what} there or change polars_cloud.credentials.{key}"
        try:
            data = path.read_bytes()
        except OSError as exc:
            # strerror only: it names the problem ("No such file or directory") and the
            # path is ours, so nothing read from the file can leak.
            raise CredentialsError(
                f"cannot read the {what} from {path}: {exc.strerror or type(exc).__name__}; {fix}"
            ) from None
        try:
            value: str | None = data.decode("utf-8").strip()
        except UnicodeDecodeError:
            value = None
        # Raised outside the handler: the codec error holds the file's bytes, and an
        # exception's __context__ travels with it even when it is not printed.
        if value is None:
            raise CredentialsError(f"{path} is not UTF-8 text; {fix}")
        if not value:
            raise CredentialsError(f"{path} is empty; {fix}")
        return value
