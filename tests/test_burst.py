"""Cold bursts on PostgreSQL: many concurrent lease requests on a profile with no context,
more than one context's worth, against a real ``pclease serve`` process.

Each round uses a profile nobody has leased yet, so every round is cold: 200 requests at
once, 64 leases per context, must give 200 leases on exactly four new contexts, and no
request may see a 5xx. Before the allocation took its locks in one order, a few requests
of most rounds got a 500 (PostgreSQL's deadlock_detected): a transaction whose join had
waited for a full context kept that row locked and then waited for the profile lock,
held by one that was waiting for the same context. The service retries deadlocks now,
but the log must show that none happened: the lock order is what this test checks.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import _truncate
from tests.live import LiveServer, run_cli, write_config

pytestmark = [pytest.mark.live, pytest.mark.postgres]

ROUNDS = 20
BURST = 200
PER_CONTEXT = 64
CONTEXTS = -(-BURST // PER_CONTEXT)  # 4


@pytest.fixture
def server(tmp_path: Path, pg_database: str) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    _truncate(pg_database)
    profile = {
        "cpus": 1,
        "memory_gb": 1,
        "idle_grace_s": 600,
        "max_leases_per_context": PER_CONTEXT,
        # Room for more than the four needed, so over-allocation would show.
        "max_contexts": 2 * CONTEXTS,
    }
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
        {f"burst{i:02d}": profile for i in range(ROUNDS)},
    )
    run_cli(config, "db", "upgrade")
    token = run_cli(config, "token", "create", "burst", "--scope", "lease").strip()
    live = LiveServer(config, tmp_path / "server.log").start()
    yield live, {"Authorization": f"Bearer {token}"}
    live.stop()


async def burst(url: str, headers: dict[str, str], profile: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as c:
        return await asyncio.gather(
            *(
                c.post("/v1/leases", json={"profile": profile, "holder": {"task_id": f"t{i}"}})
                for i in range(BURST)
            )
        )


def test_cold_bursts_start_exactly_the_contexts_needed(
    server: tuple[LiveServer, dict[str, str]],
) -> None:
    live, headers = server
    for round_ in range(ROUNDS):
        profile = f"burst{round_:02d}"
        responses = asyncio.run(burst(live.url, headers, profile))
        statuses = Counter(r.status_code for r in responses)
        failures = [r.text for r in responses if r.status_code != 201][:3]
        assert statuses == {201: BURST}, f"round {round_}: {statuses} {failures}"
        per_context = Counter(r.json()["context_id"] for r in responses)
        assert sorted(per_context.values(), reverse=True) == [64, 64, 64, 8], per_context

        listed = httpx.get(f"{live.url}/v1/contexts", params={"profile": profile}, headers=headers)
        assert listed.status_code == 200, listed.text
        assert {c["id"] for c in listed.json()["contexts"]} == set(per_context)

    scraped = httpx.get(f"{live.url}/metrics")
    assert scraped.status_code == 200, scraped.text
    starts = dict(
        re.findall(r'pclease_context_starts_total\{profile="(\w+)"\} (\S+)', scraped.text)
    )
    assert starts == {f"burst{i:02d}": "4.0" for i in range(ROUNDS)}
    log = live.log()
    assert "Traceback" not in log
    assert "lost to a concurrent one" not in log, "an allocation deadlocked and was retried"
