"""The Polars Cloud service account: its sources, and the tokens it buys.

Real parts only: files on disk, the process environment, AWS Secrets Manager served by
moto over HTTP, and a small OAuth2 token endpoint on loopback that knows one account.
Every test also checks that no secret and no token reached a log record.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest

from pclease_service.clock import FakeClock
from pclease_service.config import (
    ConfigError,
    CredentialSourceKind,
    CredentialsSettings,
    PolarsCloudSettings,
    load_settings,
)
from pclease_service.credentials import (
    CredentialsError,
    CredentialSource,
    ServiceAccount,
    TokenProvider,
    create_source,
    install_sighup,
)
from pclease_service.credentials.aws import AwsSecretsManagerSource
from pclease_service.credentials.env import EnvSource
from pclease_service.credentials.file import FileSource
from pclease_service.credentials.tokens import FORCED_REREAD_MIN_S
from tests.moto import moto_server

# Everything secret this module makes, so the log check can look for all of it.
SECRETS: list[str] = []


def secret(label: str = "secret") -> str:
    value = f"{label}-{uuid.uuid4().hex}"
    SECRETS.append(value)
    return value


@pytest.fixture(autouse=True)
def no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield
    records = [r for when in ("setup", "call") for r in caplog.get_records(when)]
    for record in records + caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        for value in SECRETS:
            assert value not in text, f"a secret reached the log: {record.name}"


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for value in SECRETS:
            assert value not in str(text) and value not in repr(text)


# -- a token endpoint -------------------------------------------------------------------
@dataclass
class TokenEndpoint:
    """An OAuth2 token endpoint that knows the accounts in ``accounts``."""

    url: str = ""
    accounts: dict[str, str] = field(default_factory=dict)
    expires_in: float | None = 120
    failures: list[int] = field(default_factory=list)  # statuses to answer first, in order
    description: str = "Invalid client or Invalid client credentials"
    calls: int = 0
    issued: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answer(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.calls += 1
            if self.failures:
                return self.failures.pop(0), {"error": "temporarily_unavailable"}
            if form.get("grant_type") != "client_credentials":
                return 400, {"error": "unsupported_grant_type"}
            client_id, client_secret = form.get("client_id", ""), form.get("client_secret", "")
            if self.accounts.get(client_id) != client_secret or not client_secret:
                # A careless server might echo what it got; {secret} lets a test do that.
                described = self.description.format(secret=client_secret)
                return 401, {"error": "invalid_client", "error_description": described}
            token = secret("token")
            self.issued.append(token)
            body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            return 200, body


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    state = TokenEndpoint()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            parsed = parse_qs(self.rfile.read(length).decode())
            status, body = state.answer({key: values[0] for key, values in parsed.items()})
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/realms/Polars/token"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_provider(
    endpoint: TokenEndpoint, clock: FakeClock
) -> Iterator[Callable[..., TokenProvider]]:
    made: list[TokenProvider] = []

    def make(source: CredentialSource, **options: Any) -> TokenProvider:
        values: dict[str, Any] = {
            "refresh_margin_s": 30,
            "reread_interval_s": 300,
            "timeout_s": 5,
            "clock": clock,
            "retry_delays_s": (0.0, 0.0),
        }
        token_url = options.pop("token_url", endpoint.url)
        values.update(options)
        provider = TokenProvider(source, token_url, **values)
        made.append(provider)
        return provider

    yield make
    for provider in made:
        provider.close()


def set_account(endpoint: TokenEndpoint, directory: Path, client_secret: str) -> FileSource:
    """The service account "pclease-sa" with this secret, in the files and at the endpoint
    alike (a rotation when it had another)."""
    endpoint.accounts["pclease-sa"] = client_secret
    return write_account(directory, "pclease-sa", client_secret)


def write_account(directory: Path, client_id: str, client_secret: str) -> FileSource:
    (directory / "client-id").write_text(client_id + "\n")
    (directory / "client-secret").write_text(client_secret + "\n")
    return FileSource(directory / "client-id", directory / "client-secret")


# -- the account itself -----------------------------------------------------------------
def test_the_account_repr_hides_the_secret() -> None:
    value = secret()
    account = ServiceAccount.of("pclease-sa", value)
    assert account.client_secret.get_secret_value() == value
    assert_no_secret(account, [account], {"a": account})
    assert "pclease-sa" in repr(account)
    assert account == ServiceAccount.of("pclease-sa", value)
    assert account != ServiceAccount.of("pclease-sa", secret())


# -- environment ------------------------------------------------------------------------
def test_env_source_reads_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    value = secret()
    monkeypatch.setenv("POLARS_CLOUD_CLIENT_ID", " pclease-sa\n")
    monkeypatch.setenv("POLARS_CLOUD_CLIENT_SECRET", value + "\n")
    source = create_source(CredentialsSettings())

    assert isinstance(source, EnvSource)
    assert source.load() == ServiceAccount.of("pclease-sa", value)
    assert source.describe() == (
        "environment variables POLARS_CLOUD_CLIENT_ID and POLARS_CLOUD_CLIENT_SECRET"
    )


def test_env_source_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    value = secret()
    monkeypatch.delenv("PC_ID", raising=False)
    monkeypatch.setenv("PC_SECRET", value)
    source = create_source(
        CredentialsSettings(client_id_env="PC_ID", client_secret_env="PC_SECRET")
    )

    with pytest.raises(CredentialsError) as raised:
        source.load()

    message = str(raised.value)
    assert message.startswith(
        "environment variable PC_ID was unset or empty when the service started; set PC_ID and"
    )
    assert message.endswith("and restart it")
    assert_no_secret(message)

    monkeypatch.setenv("PC_ID", "id")
    monkeypatch.setenv("PC_SECRET", "  ")
    blank = create_source(CredentialsSettings(client_id_env="PC_ID", client_secret_env="PC_SECRET"))
    with pytest.raises(CredentialsError, match="variable PC_SECRET was unset or empty"):
        blank.load()


def test_env_source_reads_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    value = secret()
    monkeypatch.setenv("PC_ID", "pclease-sa")
    monkeypatch.setenv("PC_SECRET", value)
    source = create_source(
        CredentialsSettings(client_id_env="PC_ID", client_secret_env="PC_SECRET")
    )
    # The backend removes the variables; what was read stays usable.
    monkeypatch.delenv("PC_ID")
    monkeypatch.delenv("PC_SECRET")
    assert source.load() == ServiceAccount.of("pclease-sa", value)
    assert_no_secret(source)


# -- files ------------------------------------------------------------------------------
def test_file_source_strips_the_trailing_newline(tmp_path: Path) -> None:
    value = secret()
    write_account(tmp_path, "pclease-sa", value)
    source = create_source(
        CredentialsSettings(
            source=CredentialSourceKind.FILE,
            client_id_file=tmp_path / "client-id",
            client_secret_file=tmp_path / "client-secret",
        )
    )

    assert isinstance(source, FileSource)
    assert source.load() == ServiceAccount.of("pclease-sa", value)
    assert source.describe() == f"files {tmp_path / 'client-id'} and {tmp_path / 'client-secret'}"


def test_file_source_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    value = secret()
    source = write_account(tmp_path, "pclease-sa", value)
    (tmp_path / "client-id").unlink()

    with pytest.raises(CredentialsError) as missing:
        source.load()
    assert str(missing.value) == (
        f"cannot read the client id from {tmp_path / 'client-id'}: No such file or directory; "
        "mount the client id there or change polars_cloud.credentials.client_id_file"
    )

    (tmp_path / "client-id").write_text("pclease-sa")
    (tmp_path / "client-secret").write_text("\n")
    with pytest.raises(CredentialsError, match=r"client-secret is empty; mount the client"):
        source.load()

    (tmp_path / "client-secret").write_bytes(b"\xff" + value.encode())
    with pytest.raises(CredentialsError, match="is not UTF-8 text") as binary:
        source.load()
    assert binary.value.__context__ is None
    assert_no_secret(missing.value, binary.value)


# -- settings ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("credentials", "problem"),
    [
        (
            {"source": "file", "client_id_file": "/run/secrets/id"},
            'polars_cloud.credentials: source = "file" needs both client_id_file and '
            "client_secret_file (the paths of the mounted secret files)",
        ),
        (
            {"source": "aws_secrets_manager"},
            'polars_cloud.credentials: source = "aws_secrets_manager" needs secret_id (the '
            "name or ARN of the secret holding client_id and client_secret)",
        ),
        (
            {"source": "vault"},
            "polars_cloud.credentials.source: Input should be 'env', 'file' or "
            "'aws_secrets_manager' (got 'vault')",
        ),
        (
            {"reread_interval_s": 0},
            "polars_cloud.credentials.reread_interval_s: Input should be greater than 0 (got 0)",
        ),
    ],
)
def test_incomplete_credential_settings_are_one_line_each(
    credentials: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(polars_cloud={"credentials": credentials})
    assert raised.value.problems == [problem]


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        (
            {"token_url": "ftp://auth.example"},
            # Not echoed: a URL may carry a password.
            "polars_cloud.token_url: must be an http:// or https:// URL",
        ),
        (
            {"api_addr": "127.0.0.1:9000"},
            "polars_cloud.api_addr: must be an http:// or https:// URL (got '127.0.0.1:9000')",
        ),
        (
            {"request_timeout_s": 0},
            "polars_cloud.request_timeout_s: Input should be greater than 0 (got 0)",
        ),
        (
            {"token_refresh_margin_s": -1},
            "polars_cloud.token_refresh_margin_s: Input should be greater than or equal to 0 "
            "(got -1)",
        ),
        (
            {"stop_unknown_computes": "maybe"},
            "polars_cloud.stop_unknown_computes: Input should be a valid boolean, unable to "
            "interpret input (got 'maybe')",
        ),
        (
            {"tokenurl": "https://auth.example"},
            "polars_cloud.tokenurl: unknown key; check its spelling against docs/configuration.md",
        ),
    ],
)
def test_bad_polars_cloud_settings_are_one_line_each(options: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(polars_cloud=options)
    assert raised.value.problems == [problem]


def test_polars_cloud_backend_needs_a_workspace() -> None:
    profiles: dict[str, Any] = {
        "small": {"instance_type": "t3.large"},
        "big": {"instance_type": "m5.4xlarge", "workspace": "analytics"},
    }
    with pytest.raises(ConfigError) as raised:
        load_settings(backend="polars_cloud", profiles=profiles)
    assert raised.value.problems == [
        "the polars_cloud backend needs a workspace for profile(s) small: set "
        "polars_cloud.workspace, or workspace in each of those profiles"
    ]

    settings = load_settings(
        backend="polars_cloud", profiles=profiles, polars_cloud={"workspace": "default"}
    )
    assert settings.polars_cloud.workspace == "default"
    assert settings.polars_cloud == PolarsCloudSettings(workspace="default")


def test_polars_cloud_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PCLEASE_POLARS_CLOUD__CREDENTIALS__SOURCE", "aws_secrets_manager")
    monkeypatch.setenv("PCLEASE_POLARS_CLOUD__CREDENTIALS__SECRET_ID", "pclease/polars-cloud")
    monkeypatch.setenv("PCLEASE_POLARS_CLOUD__CREDENTIALS__AWS_REGION", "eu-west-1")
    credentials = load_settings().polars_cloud.credentials
    assert credentials.source is CredentialSourceKind.AWS_SECRETS_MANAGER
    assert (credentials.secret_id, credentials.aws_region) == ("pclease/polars-cloud", "eu-west-1")


# -- AWS Secrets Manager (moto as a real HTTP server) ------------------------------------
@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Fake AWS credentials in the environment and an admin client for moto."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return boto3.client("secretsmanager", endpoint_url=moto_url, region_name="eu-west-1")


def aws_source(moto_url: str, secret_id: str) -> CredentialSource:
    return create_source(
        CredentialsSettings(
            source=CredentialSourceKind.AWS_SECRETS_MANAGER,
            secret_id=secret_id,
            aws_region="eu-west-1",
            aws_endpoint_url=moto_url,
        )
    )


def test_aws_source_reads_and_follows_rotation(aws: Any, moto_url: str) -> None:
    name = f"pclease/{uuid.uuid4().hex[:8]}"
    first, second = secret(), secret()
    aws.create_secret(
        Name=name, SecretString=json.dumps({"client_id": "pclease-sa", "client_secret": first})
    )
    source = aws_source(moto_url, name)

    assert isinstance(source, AwsSecretsManagerSource)
    assert source.describe() == f"AWS Secrets Manager secret {name!r} in eu-west-1 at {moto_url}"
    assert source.load() == ServiceAccount.of("pclease-sa", first)

    aws.put_secret_value(
        SecretId=name,
        SecretString=json.dumps({"client_id": "pclease-sa", "client_secret": second}),
    )
    assert source.load() == ServiceAccount.of("pclease-sa", second)


def test_aws_source_rotation_reaches_the_provider(
    aws: Any, moto_url: str, endpoint: TokenEndpoint, make_provider: Callable[..., TokenProvider]
) -> None:
    name = f"pclease/{uuid.uuid4().hex[:8]}"
    first, second = secret(), secret()
    aws.create_secret(
        Name=name, SecretString=json.dumps({"client_id": "pclease-sa", "client_secret": first})
    )
    endpoint.accounts["pclease-sa"] = first
    provider = make_provider(aws_source(moto_url, name))
    old = provider.token()

    aws.put_secret_value(
        SecretId=name,
        SecretString=json.dumps({"client_id": "pclease-sa", "client_secret": second}),
    )
    endpoint.accounts["pclease-sa"] = second
    provider.reload()
    new = provider.token()

    assert new != old
    assert endpoint.calls == 2


def test_aws_source_missing_secret_is_a_clear_error(aws: Any, moto_url: str) -> None:
    source = aws_source(moto_url, "pclease/nope")
    with pytest.raises(CredentialsError) as raised:
        source.load()
    assert str(raised.value) == (
        f"cannot read AWS Secrets Manager secret 'pclease/nope' in eu-west-1 at {moto_url}: "
        "no such secret; create it, or set polars_cloud.credentials.secret_id to its name or "
        "ARN (and aws_region to its region)"
    )


def test_aws_source_refuses_a_malformed_secret_without_quoting_it(aws: Any, moto_url: str) -> None:
    name = f"pclease/{uuid.uuid4().hex[:8]}"
    value = secret()
    aws.create_secret(Name=name, SecretString=f"client_secret={value}")
    source = aws_source(moto_url, name)
    with pytest.raises(CredentialsError, match="is not a JSON object; store") as not_json:
        source.load()
    assert not_json.value.__context__ is None

    aws.put_secret_value(SecretId=name, SecretString=json.dumps({"client_secret": value}))
    with pytest.raises(CredentialsError, match="has no non-empty string client_id; store"):
        source.load()
    assert_no_secret(not_json.value)


def test_aws_source_without_region_or_credentials(
    aws: Any, moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_region = AwsSecretsManagerSource("pclease/x", endpoint_url=moto_url)
    assert no_region.describe().endswith("'pclease/x' (no AWS region configured) at " + moto_url)
    with pytest.raises(CredentialsError, match="no AWS region is set; set polars_cloud"):
        no_region.load()

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    no_credentials = AwsSecretsManagerSource("pclease/x", region="eu-west-1", endpoint_url=moto_url)
    with pytest.raises(CredentialsError, match="found no AWS credentials for the service"):
        no_credentials.load()


# -- tokens -----------------------------------------------------------------------------
@pytest.fixture
def account_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "secrets"
    directory.mkdir()
    return directory


def test_token_is_cached_and_refreshed_before_it_expires(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    endpoint.accounts["pclease-sa"] = value
    endpoint.expires_in = 120
    provider = make_provider(write_account(account_dir, "pclease-sa", value), refresh_margin_s=30)

    first = provider.token()
    assert provider.token() == first
    clock.advance(89)
    assert provider.token() == first
    assert endpoint.calls == 1

    clock.advance(1)  # 30 s before expiry
    second = provider.token()
    assert second != first
    assert endpoint.calls == 2
    assert endpoint.issued == [first, second]


def test_short_lived_tokens_are_not_fetched_on_every_call(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    endpoint.accounts["pclease-sa"] = value
    endpoint.expires_in = 20  # shorter than the 60 s margin: refresh at half its life
    provider = make_provider(write_account(account_dir, "pclease-sa", value), refresh_margin_s=60)

    first = provider.token()
    clock.advance(9)
    assert provider.token() == first
    clock.advance(1)
    assert provider.token() != first
    assert endpoint.calls == 2


def test_many_threads_share_one_fetch(
    endpoint: TokenEndpoint, make_provider: Callable[..., TokenProvider], account_dir: Path
) -> None:
    value = secret()
    provider = make_provider(set_account(endpoint, account_dir, value))
    got: list[str] = []

    def ask() -> None:
        got.append(provider.token())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert len(got) == 8 and len(set(got)) == 1
    assert endpoint.calls == 1


def test_rejected_credentials_are_named_not_quoted(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    endpoint.accounts["pclease-sa"] = secret()  # the server expects another secret
    endpoint.description = "client secret {secret} does not match"  # and echoes what it got
    source = write_account(account_dir, "pclease-sa", value)
    provider = make_provider(source)

    with pytest.raises(CredentialsError) as raised:
        provider.token()

    assert str(raised.value) == (
        f"the Polars Cloud token endpoint rejected the service account from "
        f"{source.describe()}: invalid_client (client secret *** does not match); fix the "
        "credentials there"
    )
    status = provider.status()
    assert not status.ok
    assert status.message == str(raised.value)
    assert status.token_expires_at is None
    assert_no_secret(raised.value, status)

    # The same refused account is not sent again at once ...
    with pytest.raises(CredentialsError, match="rejected the service account"):
        provider.token()
    assert endpoint.calls == 1
    # ... but a fixed source is picked up a few seconds later, without invalidate().
    fixed = secret()
    endpoint.accounts["pclease-sa"] = fixed
    source.client_secret_file.write_text(fixed)
    clock.advance(FORCED_REREAD_MIN_S)
    assert provider.token() == endpoint.issued[-1]
    assert provider.status().ok


def test_unreachable_and_failing_endpoints(
    endpoint: TokenEndpoint, make_provider: Callable[..., TokenProvider], account_dir: Path
) -> None:
    value = secret()
    source = set_account(endpoint, account_dir, value)

    endpoint.failures = [503, 502]
    provider = make_provider(source)
    assert provider.token() == endpoint.issued[0]
    assert endpoint.calls == 3

    endpoint.failures = [503, 503, 503]
    failing = make_provider(source)
    with pytest.raises(CredentialsError) as failed:
        failing.token()
    assert str(failed.value) == (
        f"could not reach the Polars Cloud token endpoint {endpoint.url}: HTTP 503 (tried 3 "
        "times within 20 s); check the network and polars_cloud.token_url"
    )

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/token"
    unreachable = make_provider(source, token_url=closed)
    with pytest.raises(CredentialsError, match=f"could not reach .* {closed}: ConnectError"):
        unreachable.token()
    assert not unreachable.status().ok


def test_invalidate_after_a_401_picks_up_a_rotated_secret(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    account_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old_secret, new_secret = secret(), secret()
    source = set_account(endpoint, account_dir, old_secret)
    provider = make_provider(source)
    old = provider.token()

    # Rotated at the source and at Polars Cloud; the API now refuses the old token.
    set_account(endpoint, account_dir, new_secret)
    assert provider.token() == old  # nothing re-read yet
    provider.invalidate(old)
    new = provider.token()

    assert new != old
    assert endpoint.calls == 2
    provider.invalidate(old)  # a late 401 for the old token leaves the new one alone
    assert provider.token() == new
    messages = [r.getMessage() for r in caplog.records if r.name == "pclease.credentials"]
    assert any("changed (client id pclease-sa)" in m for m in messages)
    assert_no_secret(provider.status())


def test_the_source_is_reread_every_interval(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    endpoint.accounts["pclease-sa"] = value
    endpoint.accounts["pclease-sa-2"] = value
    endpoint.expires_in = 3600
    provider = make_provider(write_account(account_dir, "pclease-sa", value), reread_interval_s=60)
    first = provider.token()

    write_account(account_dir, "pclease-sa-2", value)
    clock.advance(59)
    assert provider.token() == first
    clock.advance(1)
    second = provider.token()
    assert second != first

    # A source that breaks later does not take the working account away.
    (account_dir / "client-secret").unlink()
    clock.advance(60)
    assert provider.token() == second
    status = provider.status()
    assert status.ok
    assert status.message is not None
    assert status.message.startswith("cannot read the client secret from")
    assert status.message.endswith("(still using the service account read before)")


def test_reload_keeps_the_token_unless_the_account_changed(
    endpoint: TokenEndpoint, make_provider: Callable[..., TokenProvider], account_dir: Path
) -> None:
    value, rotated = secret(), secret()
    provider = make_provider(set_account(endpoint, account_dir, value))
    first = provider.token()

    provider.reload()
    assert provider.token() == first
    assert endpoint.calls == 1

    set_account(endpoint, account_dir, rotated)
    provider.reload()
    assert provider.token() != first
    assert endpoint.calls == 2

    (account_dir / "client-id").write_text("")
    with pytest.raises(CredentialsError, match="client-id is empty"):
        provider.reload()
    assert provider.token() == endpoint.issued[-1]  # still the rotated account's token


def test_sighup_rereads_the_source(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value, rotated = secret(), secret()
    provider = make_provider(set_account(endpoint, account_dir, value))
    first = provider.token()
    set_account(endpoint, account_dir, rotated)
    reloaded_at = clock.advance(1)

    uninstall = install_sighup(provider)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 5
        while provider.status().checked_at != reloaded_at:
            assert time.monotonic() < deadline, "SIGHUP did not re-read the source"
            time.sleep(0.01)
    finally:
        uninstall()

    assert provider.token() != first
    assert endpoint.calls == 2


def test_status_tells_what_readiness_needs(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    endpoint.accounts["pclease-sa"] = value
    endpoint.expires_in = None  # not sent: assume five minutes
    source = write_account(account_dir, "pclease-sa", value)
    provider = make_provider(source)

    before = provider.status()
    assert (before.ok, before.source, before.message) == (
        False,
        source.describe(),
        "not checked yet",
    )
    assert before.checked_at is None

    status = provider.check()
    assert status.ok
    assert status.message is None
    assert status.checked_at == clock.now()
    assert status.token_expires_at is not None
    assert (status.token_expires_at - clock.now()).total_seconds() == 300
    assert_no_secret(status)
    assert endpoint.issued[0] not in repr(status)

    provider.invalidate()
    assert provider.status().token_expires_at is None

    # A source that cannot be read after a 401: the account read before buys a new token.
    (account_dir / "client-id").unlink()
    kept = provider.check()
    assert kept.ok
    assert kept.message is not None
    assert kept.message.startswith("cannot read the client id from")
    assert kept.message.endswith("(still using the service account read before)")

    # Refused as well: nothing works any more.
    del endpoint.accounts["pclease-sa"]
    provider.invalidate()
    broken = provider.check()
    assert not broken.ok
    assert broken.message is not None
    assert "cannot read the client id from" in broken.message
    assert "rejected the service account" in broken.message


def test_a_failed_refresh_keeps_serving_the_valid_token(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    endpoint.accounts["pclease-sa"] = value
    endpoint.expires_in = 120
    provider = make_provider(write_account(account_dir, "pclease-sa", value), refresh_margin_s=30)
    first = provider.token()

    clock.advance(95)  # inside the margin: refresh, but the endpoint is down
    endpoint.failures = [503, 503, 503]
    assert provider.token() == first
    status = provider.status()
    assert status.ok
    assert status.message is not None
    assert status.message.startswith("refreshing the access token failed: could not reach")

    clock.advance(1)
    assert provider.token() == first
    assert endpoint.calls == 4  # not retried on every call

    clock.advance(4)
    second = provider.token()
    assert second != first
    assert provider.status().message is None

    clock.advance(120)  # expired and the endpoint down: nothing valid to serve
    endpoint.failures = [503, 503, 503]
    with pytest.raises(CredentialsError, match="could not reach the Polars Cloud token"):
        provider.token()
    assert not provider.status().ok


def test_a_refused_refresh_keeps_serving_the_valid_token(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    provider = make_provider(set_account(endpoint, account_dir, value), refresh_margin_s=30)
    first = provider.token()

    del endpoint.accounts["pclease-sa"]  # revoked at Polars Cloud; issued tokens live on
    clock.advance(95)
    assert provider.token() == first
    clock.advance(5)
    assert provider.token() == first  # the refusal is remembered, not sent again
    assert endpoint.calls == 2
    status = provider.status()
    assert status.ok
    assert status.message is not None
    assert "rejected the service account" in status.message

    clock.advance(30)
    with pytest.raises(CredentialsError, match="rejected the service account"):
        provider.token()
    assert not provider.status().ok


class CountingSource(CredentialSource):
    """A file source that counts its reads and can be made to fail for a while."""

    name = "counting"

    def __init__(self, inner: FileSource) -> None:
        self.inner = inner
        self.loads = 0
        self.broken = False

    @classmethod
    def from_settings(cls, settings: CredentialsSettings) -> CountingSource:
        raise NotImplementedError

    def describe(self) -> str:
        return self.inner.describe()

    def load(self) -> ServiceAccount:
        self.loads += 1
        if self.broken:
            raise CredentialsError(f"cannot read {self.describe()}: temporarily unavailable")
        return self.inner.load()


def test_a_failed_reread_after_a_refusal_keeps_the_valid_token(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value = secret()
    source = CountingSource(set_account(endpoint, account_dir, value))
    provider = make_provider(source, refresh_margin_s=30)
    first = provider.token()

    del endpoint.accounts["pclease-sa"]
    clock.advance(95)  # refresh due; the endpoint refuses: a re-read is asked for
    assert provider.token() == first
    source.broken = True
    clock.advance(FORCED_REREAD_MIN_S)
    assert provider.token() == first  # the re-read failed, the token is still valid
    assert source.loads == 2
    assert provider.status().ok


def test_while_refused_the_source_is_not_reread_on_every_call(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    source = CountingSource(write_account(account_dir, "pclease-sa", secret()))
    provider = make_provider(source)
    for _ in range(20):
        with pytest.raises(CredentialsError, match="rejected the service account"):
            provider.token()
    assert source.loads == 1
    assert endpoint.calls == 1
    clock.advance(FORCED_REREAD_MIN_S)
    with pytest.raises(CredentialsError, match="rejected the service account"):
        provider.token()
    assert source.loads == 2


def test_a_changed_account_replaces_the_token_only_once_it_has_one(
    endpoint: TokenEndpoint,
    make_provider: Callable[..., TokenProvider],
    clock: FakeClock,
    account_dir: Path,
) -> None:
    value, rotated = secret(), secret()
    provider = make_provider(set_account(endpoint, account_dir, value))
    first = provider.token()

    set_account(endpoint, account_dir, rotated)
    endpoint.failures = [503, 503, 503]  # the token endpoint is down during the rotation
    with pytest.raises(CredentialsError, match=r"changed .* no access token could be fetched"):
        provider.reload()
    assert provider.token() == first  # the old account's token stays in use
    status = provider.status()
    assert status.ok
    assert status.message is not None and "changed" in status.message

    clock.advance(FORCED_REREAD_MIN_S)  # the endpoint is back: the next call switches
    second = provider.token()
    assert second != first
    assert second == endpoint.issued[-1]
    assert provider.status().message is None


def test_a_token_fetch_ends_within_its_deadline(
    endpoint: TokenEndpoint, make_provider: Callable[..., TokenProvider], account_dir: Path
) -> None:
    value = secret()
    endpoint.accounts["pclease-sa"] = value
    endpoint.failures = [503] * 10
    provider = make_provider(
        write_account(account_dir, "pclease-sa", value),
        retry_delays_s=(0.4, 0.4, 0.4, 0.4),
        deadline_s=1.0,
    )
    began = time.monotonic()
    with pytest.raises(CredentialsError, match=r"HTTP 503 \(tried 3 times within 1 s\)"):
        provider.token()
    assert time.monotonic() - began < 1.5
