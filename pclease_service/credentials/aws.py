"""The service account from an AWS Secrets Manager secret.

The secret's ``SecretString`` is JSON ``{"client_id": "...", "client_secret": "..."}``.
AWS credentials come from boto3's usual chain (environment, shared config, instance or
task role); only the region and endpoint can be set in pclease's configuration.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Self

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from pclease_service.config import CredentialsSettings
from pclease_service.credentials.base import CredentialsError, CredentialSource, ServiceAccount

_SHAPE = '{"client_id": "...", "client_secret": "..."}'

# At DEBUG botocore logs request parameters (botocore.endpoint) and response bodies
# (botocore.parsers): for GetSecretValue that is the secret itself. Keep both at INFO
# whatever the root level, so `--log-level debug` cannot write the secret to the logs.
for _name in ("botocore.endpoint", "botocore.parsers"):
    logging.getLogger(_name).setLevel(logging.INFO)


class AwsSecretsManagerSource(CredentialSource):
    """Calls ``GetSecretValue`` on every :meth:`load`."""

    name = "aws_secrets_manager"

    def __init__(
        self,
        secret_id: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.secret_id = secret_id
        self.endpoint_url = endpoint_url
        self._session = boto3.session.Session(region_name=region)
        self.region: str | None = self._session.region_name
        self._timeout_s = timeout_s
        self._client: Any = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: CredentialsSettings) -> Self:
        if not settings.secret_id:
            raise CredentialsError(
                "the aws_secrets_manager credential source needs polars_cloud.credentials.secret_id"
            )
        return cls(
            settings.secret_id, region=settings.aws_region, endpoint_url=settings.aws_endpoint_url
        )

    def describe(self) -> str:
        where = f"in {self.region}" if self.region else "(no AWS region configured)"
        at = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"AWS Secrets Manager secret {self.secret_id!r} {where}{at}"

    def load(self) -> ServiceAccount:
        problem: str | None = None
        response: Any = None
        try:
            response = self._secretsmanager().get_secret_value(SecretId=self.secret_id)
        except ClientError as exc:
            problem = _client_error(exc)
        except NoCredentialsError:
            problem = (
                "found no AWS credentials for the service; give it an AWS identity "
                "(instance or task role, AWS_PROFILE, or AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY)"
            )
        except NoRegionError:
            problem = "no AWS region is set; set polars_cloud.credentials.aws_region or AWS_REGION"
        except BotoCoreError as exc:
            problem = f"could not reach AWS Secrets Manager: {exc}"
        if problem is not None:
            raise CredentialsError(f"cannot read {self.describe()}: {problem}")
        return self._parse(response)

    def _secretsmanager(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._session.client(
                    "secretsmanager",
                    endpoint_url=self.endpoint_url,
                    config=Config(
                        connect_timeout=self._timeout_s,
                        read_timeout=self._timeout_s,
                        retries={"mode": "standard", "max_attempts": 3},
                    ),
                )
            return self._client

    def _parse(self, response: Any) -> ServiceAccount:
        text = response.get("SecretString")
        if not isinstance(text, str):
            raise CredentialsError(
                f"{self.describe()} holds no SecretString (a binary secret?); store {_SHAPE} "
                "as its secret string"
            )
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = None
        # Raised outside the handler: the JSON error holds the whole document, i.e. the
        # secret, and an exception's __context__ travels with it.
        if not isinstance(data, dict):
            raise CredentialsError(
                f"{self.describe()} is not a JSON object; store {_SHAPE} as its secret string"
            )
        client_id = data.get("client_id")
        client_secret = data.get("client_secret")
        missing = [
            key
            for key, value in (("client_id", client_id), ("client_secret", client_secret))
            if not isinstance(value, str) or not value.strip()
        ]
        if missing:
            raise CredentialsError(
                f"{self.describe()} has no non-empty string {' or '.join(missing)}; store "
                f"{_SHAPE} as its secret string"
            )
        assert isinstance(client_id, str) and isinstance(client_secret, str)
        return ServiceAccount.of(client_id.strip(), client_secret.strip())


def _client_error(exc: ClientError) -> str:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "error"))
    if code == "ResourceNotFoundException":
        return (
            "no such secret; create it, or set polars_cloud.credentials.secret_id to its "
            "name or ARN (and aws_region to its region)"
        )
    if code == "AccessDeniedException":
        return (
            "access denied; allow the service's AWS identity secretsmanager:GetSecretValue "
            "on the secret (and kms:Decrypt on its key)"
        )
    if code == "DecryptionFailure":
        return "AWS cannot decrypt it; allow the service's AWS identity kms:Decrypt on its key"
    if code in {
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
    }:
        return f"AWS rejected the service's AWS credentials ({code}); fix its AWS identity"
    # AWS error messages describe the request (which carries no secret), never the value.
    message = str(error.get("Message", ""))[:200]
    return f"AWS answered {code}: {message}" if message else f"AWS answered {code}"
