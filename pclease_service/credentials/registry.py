"""Which class reads which :class:`~service.config.CredentialSourceKind`.

Sources are imported only when chosen, so boto3 is not imported for the env source.
"""

from __future__ import annotations

import importlib

from pclease_service.config import CredentialSourceKind, CredentialsSettings
from pclease_service.credentials.base import CredentialSource

SOURCES: dict[CredentialSourceKind, str] = {
    CredentialSourceKind.ENV: "pclease_service.credentials.env:EnvSource",
    CredentialSourceKind.FILE: "pclease_service.credentials.file:FileSource",
    CredentialSourceKind.AWS_SECRETS_MANAGER: (
        "pclease_service.credentials.aws:AwsSecretsManagerSource"
    ),
}


def source_class(kind: CredentialSourceKind) -> type[CredentialSource]:
    module_name, _, class_name = SOURCES[kind].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    assert isinstance(cls, type) and issubclass(cls, CredentialSource)
    return cls


def create_source(settings: CredentialsSettings) -> CredentialSource:
    """The source ``polars_cloud.credentials`` describes. Reads nothing yet."""
    return source_class(settings.source).from_settings(settings)
