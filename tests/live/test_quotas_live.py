"""Quotas against a real ``pclease serve`` on PostgreSQL: a concurrent burst cannot pass a
limit twice, and a changed config file applies on SIGHUP without a restart."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devkit.live import LiveServer, run_cli, write_config
from tests.harness import truncate

pytestmark = [pytest.mark.live, pytest.mark.postgres]

BURST = 40


def quotas_toml(max_live_leases: int | str) -> str:
    return f"""
[quotas.tokens.team-a]
max_live_leases = {max_live_leases}

[quotas.tokens.team-b.profiles.solo]
max_live_contexts = 1
"""


@pytest.fixture
def server(tmp_path: Path, pg_database: str) -> Iterator[tuple[LiveServer, Path, dict[str, str]]]:
    truncate(pg_database)
    config = write_config(
        tmp_path / "pclease.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "database_url": pg_database,
            "backend": "memory",
            "reconcile_interval_s": 0.1,
            "token_cache_s": 60,
            "lease_wait_default_s": 0,
        },
        {
            "shared": {"cpus": 1, "memory_gb": 1, "max_contexts": 4},
            # One lease per context: every granted lease past the first starts one.
            "solo": {"cpus": 1, "memory_gb": 1, "max_leases_per_context": 1, "max_contexts": 50},
        },
    )
    base = config.read_text()
    config.write_text(base + quotas_toml(1))
    run_cli(config, "db", "upgrade")
    tokens = {
        name: run_cli(config, "token", "create", name, "--scope", "lease").strip()
        for name in ("team-a", "team-b")
    }
    live = LiveServer(config, tmp_path / "server.log").start()
    yield live, config, tokens
    live.stop()


async def burst(url: str, token: str, profile: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:
        return await asyncio.gather(
            *(
                c.post("/v1/leases", json={"profile": profile, "holder": {"task_id": f"t{i}"}})
                for i in range(BURST)
            )
        )


def lease(live: LiveServer, token: str, profile: str = "shared") -> httpx.Response:
    return httpx.post(
        f"{live.url}/v1/leases",
        json={"profile": profile},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def wait_for_log(live: LiveServer, text: str, count: int) -> None:
    deadline = time.monotonic() + 20
    while live.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{live.log()}"
        time.sleep(0.1)


def test_a_concurrent_burst_passes_each_limit_once(
    server: tuple[LiveServer, Path, dict[str, str]],
) -> None:
    live, _, tokens = server
    responses = asyncio.run(burst(live.url, tokens["team-a"], "shared"))
    assert Counter(r.status_code for r in responses) == {201: 1, 429: BURST - 1}
    refused = [r.json()["error"] for r in responses if r.status_code == 429]
    assert {e["code"] for e in refused} == {"quota_exceeded"}
    assert {(e["quota"]["name"], e["quota"]["used"], e["quota"]["limit"]) for e in refused} == {
        ("live_leases", 1, 1)
    }

    # One lease per context and one context allowed: exactly one request may start one.
    responses = asyncio.run(burst(live.url, tokens["team-b"], "solo"))
    assert Counter(r.status_code for r in responses) == {201: 1, 429: BURST - 1}
    refused = [r.json()["error"]["quota"] for r in responses if r.status_code == 429]
    assert {(q["name"], q["profile"], q["used"], q["limit"]) for q in refused} == {
        ("live_contexts", "solo", 1, 1)
    }
    listed = httpx.get(
        f"{live.url}/v1/contexts",
        params={"profile": "solo"},
        headers={"Authorization": f"Bearer {tokens['team-b']}"},
    )
    assert listed.status_code == 200, listed.text
    assert len(listed.json()["contexts"]) == 1
    log = live.log()
    assert "Traceback" not in log
    assert "lost to a concurrent one" not in log, "a grant deadlocked and was retried"


def test_a_changed_quota_applies_on_sighup(
    server: tuple[LiveServer, Path, dict[str, str]],
) -> None:
    live, config, tokens = server
    assert live.proc is not None
    team = tokens["team-a"]
    assert lease(live, team).status_code == 201
    refused = lease(live, team)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["quota"]["limit"] == 1

    base = config.read_text().split("\n[quotas.")[0]
    config.write_text(base + quotas_toml(2))
    live.proc.send_signal(signal.SIGHUP)
    wait_for_log(live, "SIGHUP: quotas replaced", 1)
    assert lease(live, team).status_code == 201
    refused = lease(live, team)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["quota"]["limit"] == 2

    # A file that does not validate changes nothing: the limit in force stays.
    config.write_text(base + quotas_toml(-1))
    live.proc.send_signal(signal.SIGHUP)
    wait_for_log(live, "the quotas in force stay", 1)
    assert "quotas.tokens.team-a.max_live_leases" in live.log()
    refused = lease(live, team)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["quota"]["limit"] == 2
    assert live.proc.poll() is None
