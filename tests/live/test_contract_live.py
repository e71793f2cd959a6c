"""The API contract, fuzzed: schemathesis reads a live ``pclease serve``'s /openapi.json and
throws generated requests at every operation, with an admin token and with a lease token,
on SQLite and PostgreSQL. It must find no 5xx and no answer that the document does not
describe (status, content type, headers, body schema), and refused input must be refused
with a 4xx.

Two checks are left out, as they assume what this API does not promise:

- ``positive_data_acceptance`` (every schema-valid request succeeds): answers depend on
  state and settings the schema cannot know. A lease that has ended answers 410, ``ttl_s``
  must lie within the deployment's ``lease_ttl_min_s`` and ``lease_ttl_max_s``, and a plan
  must be a real Polars plan.
- ``use_after_free`` (a DELETEd resource answers 404): ``DELETE /v1/leases/{id}`` ends a
  lease, and the ended lease stays readable, with how and why it ended.

Also here, against the same server: the README's curl example works as written.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import polars as pl
import pytest

from devkit.live import LiveServer, run_cli, write_config
from pclease_client import PcleaseClient, build_submission
from tests.harness import truncate

pytestmark = pytest.mark.live

README = Path(__file__).resolve().parents[2] / "README.md"
ST = [sys.executable, "-m", "schemathesis.cli"]
MAX_EXAMPLES = 15


@dataclass
class Api:
    server: LiveServer
    tmp_path: Path
    tokens: dict[str, str]
    queries: dict[str, str]  # token name -> a query it may see


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp_path = tmp_path_factory.mktemp(f"contract-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pclease.db'}"
    else:
        url = request.getfixturevalue("pg_database")
        truncate(url)
    config = write_config(
        tmp_path / "pclease.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "database_url": url,
            "backend": "memory",
            "reconcile_interval_s": 0.2,
            "token_cache_s": 0,
            # Waits the fuzzer may ask for stay short, so no request outlives its timeout.
            "lease_wait_default_s": 0,
            "lease_wait_max_s": 2,
            "long_poll_max_s": 2,
        },
        {
            "small": {"cpus": 1, "memory_gb": 1, "max_leases_per_context": 4, "max_contexts": 2},
            "large": {"cpus": 2, "memory_gb": 2},
        },
    )
    # The admin token soon meets its quotas, so their refusals are checked against the
    # document too.
    config.write_text(
        config.read_text()
        + "\n[quotas.tokens.fuzz-admin]\nmax_live_leases = 3\n"
        + "\n[quotas.tokens.fuzz-admin.profiles.small]\nmax_live_contexts = 1\n"
    )
    run_cli(config, "db", "upgrade")
    tokens = {
        scope: run_cli(config, "token", "create", f"fuzz-{scope}", "--scope", scope).strip()
        for scope in ("admin", "lease")
    }
    server = LiveServer(config, tmp_path / "server.log").start()
    # A real query each token can see, for the operations that take a query id (a fuzzer
    # cannot write a Polars plan).
    client = PcleaseClient(server.url, tokens["lease"])
    lease = client.create_lease("large", holder={"dag_id": "fuzz", "run_id": "r1"})
    submission = build_submission(pl.LazyFrame({"a": [1, 2]}), "collect")
    query = client.submit(lease.id, submission)
    client.close()
    try:
        yield Api(server, tmp_path, tokens, {"admin": query.id, "lease": query.id})
    finally:
        server.stop()


@pytest.mark.parametrize("token", ["admin", "lease"])
def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    api: Api, token: str
) -> None:
    workdir = api.tmp_path / f"st-{token}"  # schemathesis keeps its caches in its cwd
    workdir.mkdir()
    settings = workdir / "schemathesis.toml"
    settings.write_text(
        "[[operations]]\n"
        'include-path-regex = "^/v1/queries/"\n'
        f'parameters = {{ "query_id" = "{api.queries[token]}" }}\n'
    )
    result = subprocess.run(
        [
            *ST,
            "--config-file",
            str(settings),
            "run",
            f"{api.server.url}/openapi.json",
            "--header",
            f"Authorization: Bearer {api.tokens[token]}",
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance,use_after_free",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--workers",
            "1",
            "--request-timeout",
            "15",
            "--no-color",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = result.stdout + result.stderr
    print(report[-6000:])  # shown with -s, and kept in the report of a failure
    assert result.returncode == 0, report[-20000:]
    assert re.search(r"Tested: 19\b", report), report[-5000:]
    assert "passed" in report
    log = api.server.log()
    assert "Traceback" not in log, log[-10000:]
    assert "unexpected error" not in log, log[-10000:]
    if token == "admin":
        # Its quota refused some of its lease requests: those answers were checked too.
        scraped = httpx.get(f"{api.server.url}/metrics")
        assert scraped.status_code == 200
        refused = re.search(
            r'pclease_lease_request_seconds_count\{outcome="quota_exceeded"\} (\S+)', scraped.text
        )
        assert refused is not None and float(refused.group(1)) > 0, scraped.text[-3000:]


def readme_commands() -> list[list[str]]:
    """The curl commands of the README's example, as argument lists."""
    text = README.read_text()
    block = text.split("A lease from any HTTP client:", 1)[1].split("```sh", 1)[1]
    block = block.split("```", 1)[0].replace("\\\n", " ")
    lines = [line for line in block.splitlines() if line.strip().startswith("curl")]
    return [shlex.split(line) for line in lines]


def test_the_readme_curl_example_works_as_written(api: Api) -> None:
    commands = readme_commands()
    assert len(commands) == 3
    lease_id = ""
    statuses = []
    for argv in commands:
        method, url, headers, body = "GET", "", {}, None
        args = iter(argv[1:])
        for arg in args:
            if arg == "-X":
                method = next(args)
            elif arg == "-H":
                name, _, value = next(args).partition(":")
                headers[name.strip()] = value.strip()
            elif arg == "-d":
                body = next(args).encode()
            else:
                url = arg
        url = url.replace("localhost:8040", api.server.url).replace("$LEASE", lease_id)
        headers = {k: v.replace("$TOKEN", api.tokens["lease"]) for k, v in headers.items()}
        response = httpx.request(method, url, headers=headers, content=body)
        statuses.append(response.status_code)
        assert response.status_code < 300, (argv, response.text)
        lease_id = lease_id or response.json()["id"]
    assert statuses == [201, 200, 200]
