"""End-to-end: a real uvicorn process, real worker processes, SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from devkit.live import LiveServer, run_cli, write_config
from pclease_service.db.engine import create_db_engine
from pclease_service.db.schema import contexts, events, leases

pytestmark = pytest.mark.live

PROFILES = {
    "small": {
        "cpus": 1,
        "memory_gb": 1,
        "idle_grace_s": 2,
        "max_leases_per_context": 100,
        "hourly_cost": 0.5,
    },
    "slow": {
        "cpus": 1,
        "memory_gb": 1,
        "idle_grace_s": 2,
        "max_leases_per_context": 100,
        "local": {"boot_delay_s": 1.5},
    },
}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has exited all the same.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[-1].split()[0] != "Z"


def wait_until(predicate: Any, timeout_s: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class Env:
    def __init__(self, tmp_path: Path, database_url: str) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.data_dir = tmp_path / "data"
        self.config = write_config(
            tmp_path / "pclease.toml",
            {
                "data_dir": str(self.data_dir),
                "database_url": database_url,
                "backend": "local",
                "reconcile_interval_s": 0.2,
                "health_check_interval_s": 0.5,
                "orphan_sweep_interval_s": 5,
                "lease_ttl_min_s": 1,
            },
            PROFILES,
        )
        run_cli(self.config, "db", "upgrade")
        self.token = run_cli(self.config, "token", "create", "e2e", "--scope", "admin").strip()
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.servers: list[LiveServer] = []

    def server(self) -> LiveServer:
        server = LiveServer(self.config, self.tmp_path / "server.log").start()
        self.servers.append(server)
        return server

    def rows(self, table: Any) -> list[dict[str, Any]]:
        engine = create_db_engine(self.database_url, pool_size=1)
        with engine.connect() as conn:
            result = [dict(r._mapping) for r in conn.execute(select(table))]
        engine.dispose()
        return result

    def worker_pids(self) -> list[int]:
        pids = []
        for row in self.rows(contexts):
            if row["backend_handle"] and row["state"] in ("starting", "running", "idle"):
                pids.append(int(row["backend_handle"]["pid"]))
        return pids


@pytest.fixture
def env(tmp_path: Path, database_url: str) -> Iterator[Env]:
    environment = Env(tmp_path, database_url)
    yield environment
    for server in environment.servers:
        server.stop()
    # Whatever a test left behind must not outlive it.
    for meta in (environment.data_dir / "local" / "workers").glob("*/meta.json"):
        handle = json.loads(meta.read_text()).get("pid")
        if isinstance(handle, int) and alive(handle):
            os.kill(handle, 9)


def wait_active(url: str, headers: dict[str, str], lease_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = httpx.get(
            f"{url}/v1/leases/{lease_id}",
            params={"wait_s": 5, "state": "pending"},
            headers=headers,
            timeout=10,
        )
        assert r.status_code == 200, r.text
        lease: dict[str, Any] = r.json()
        if lease["state"] != "pending":
            return lease
    raise AssertionError("lease never left pending")


def test_fifty_concurrent_leases_on_a_cold_profile_start_exactly_one_context(env: Env) -> None:
    server = env.server()

    async def one(i: int) -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await client.post(
                "/v1/leases",
                json={"profile": "slow", "holder": {"task_id": f"t{i}"}},
                headers={**env.headers, "Idempotency-Key": f"k{i}"},
            )

    async def all_of_them() -> list[httpx.Response]:
        return await asyncio.gather(*(one(i) for i in range(60)))

    responses = asyncio.run(all_of_them())
    assert [r.status_code for r in responses] == [201] * 60
    context_ids = {r.json()["context_id"] for r in responses}
    assert len(context_ids) == 1, server.log()

    lease = wait_active(server.url, env.headers, responses[0].json()["id"])
    assert lease["state"] == "active"
    starts = [e for e in env.rows(events) if e["kind"] == "context" and e["to_state"] == "starting"]
    assert len(starts) == 1
    assert len(env.rows(contexts)) == 1
    workers = list((env.data_dir / "local" / "workers").glob("*/meta.json"))
    assert len(workers) == 1
    context = httpx.get(f"{server.url}/v1/contexts/{context_ids.pop()}", headers=env.headers).json()
    assert context["refcount"] == 60


def test_killed_service_restarts_without_losing_leases_or_starting_twice(env: Env) -> None:
    server = env.server()
    kept = httpx.post(
        f"{server.url}/v1/leases", json={"profile": "small", "ttl_s": 30}, headers=env.headers
    ).json()
    forgotten = httpx.post(
        f"{server.url}/v1/leases", json={"profile": "small", "ttl_s": 3}, headers=env.headers
    ).json()
    wait_active(server.url, env.headers, kept["id"])
    [pid] = env.worker_pids()

    server.kill()
    assert alive(pid), "the worker must survive its service, so a restart can adopt it"
    server = env.server()

    beat = httpx.post(f"{server.url}/v1/leases/{kept['id']}/heartbeat", headers=env.headers)
    assert beat.status_code == 200, beat.text
    assert env.worker_pids() == [pid]

    def expired() -> bool:
        lease = httpx.get(f"{server.url}/v1/leases/{forgotten['id']}", headers=env.headers)
        return bool(lease.json()["state"] == "expired")

    wait_until(expired, what="the unheartbeaten lease to expire after the restart")
    released = httpx.delete(f"{server.url}/v1/leases/{kept['id']}", headers=env.headers)
    assert released.json()["state"] == "released"

    def stopped() -> bool:
        ctx = httpx.get(f"{server.url}/v1/contexts/{kept['context_id']}", headers=env.headers)
        return bool(ctx.json()["state"] == "stopped")

    wait_until(stopped, what="the idle stop after the restart")
    wait_until(lambda: not alive(pid), what="the worker to exit")
    starts = [e for e in env.rows(events) if e["kind"] == "context" and e["to_state"] == "starting"]
    assert len(starts) == 1


def test_a_crash_under_load_loses_no_grant_and_only_the_last_batch_of_heartbeats(
    env: Env,
) -> None:
    """SIGKILL while clients heartbeat and lease as fast as they can. Every lease the
    service granted is there after the restart, still live; of the heartbeats, only those
    acknowledged in the last batch may be lost (``heartbeat_flush_s``, 0.25 s, plus the
    time the batch takes to write under this load: bounded here by 0.75 s, where a replica
    that wrote no batch would have lost 1.5 s, back to the last heartbeat it read from the
    database)."""
    server = env.server()
    warm = []
    for _ in range(16):
        created = httpx.post(
            f"{server.url}/v1/leases", json={"profile": "small", "ttl_s": 60}, headers=env.headers
        )
        assert created.status_code == 201, created.text
        warm.append(created.json()["id"])
    wait_active(server.url, env.headers, warm[-1])
    acknowledged: dict[str, datetime] = {}  # the latest heartbeat_at answered, per lease
    granted: list[str] = []

    async def load() -> None:
        async with httpx.AsyncClient(
            base_url=server.url, headers=env.headers, timeout=10
        ) as client:

            async def heartbeat(lease_id: str) -> None:
                while True:
                    try:
                        answer = await client.post(f"/v1/leases/{lease_id}/heartbeat")
                    except httpx.TransportError:
                        return  # the service is gone
                    assert answer.status_code == 200, answer.text
                    at = datetime.fromisoformat(answer.json()["heartbeat_at"])
                    acknowledged[lease_id] = max(at, acknowledged.get(lease_id, at))

            async def lease() -> None:
                while True:
                    try:
                        answer = await client.post(
                            "/v1/leases", json={"profile": "small", "ttl_s": 60}
                        )
                    except httpx.TransportError:
                        return
                    assert answer.status_code == 201, answer.text
                    granted.append(answer.json()["id"])

            async def crash() -> None:
                await asyncio.sleep(3.5)
                await asyncio.to_thread(server.kill)

            await asyncio.gather(crash(), *(heartbeat(i) for i in warm * 2), lease(), lease())

    asyncio.run(load())
    assert set(acknowledged) == set(warm)
    assert granted, "no lease was granted under load"

    written = {row["id"]: row for row in env.rows(leases)}
    for lease_id in granted:
        assert written[lease_id]["state"] in ("pending", "active"), written[lease_id]
    for lease_id, at in acknowledged.items():
        beat = written[lease_id]["heartbeat_at"]
        beat = beat if beat.tzinfo else beat.replace(tzinfo=UTC)
        assert beat > at - timedelta(seconds=0.75), (lease_id, beat, at)

    server = env.server()
    for lease_id in warm:
        beat = httpx.post(f"{server.url}/v1/leases/{lease_id}/heartbeat", headers=env.headers)
        assert beat.status_code == 200, beat.text
    starts = [e for e in env.rows(events) if e["kind"] == "context" and e["to_state"] == "starting"]
    assert len(starts) == 1


def test_restart_stops_workers_the_database_does_not_know(env: Env) -> None:
    from pclease_service.backends.base import (
        LABEL_CONTEXT_ID,
        LABEL_INSTANCE,
        LABEL_MANAGED_BY,
        ContextSpec,
    )
    from pclease_service.backends.local import LocalBackend

    backend = LocalBackend(env.data_dir / "local")
    spec = ContextSpec(
        context_id="00000000-0000-0000-0000-000000000000",
        profile="small",
        cpus=1,
        memory_gb=1,
        labels={
            LABEL_MANAGED_BY: "pclease",
            LABEL_INSTANCE: "pclease",
            LABEL_CONTEXT_ID: "00000000-0000-0000-0000-000000000000",
        },
    )
    handle = asyncio.run(backend.start(spec))
    pid = int(handle["pid"])
    assert alive(pid)

    env.server()
    wait_until(lambda: not alive(pid), what="the orphaned worker to be stopped")
    asyncio.run(backend.stop(handle))  # reaps the child this test spawned; already gone


def test_sigterm_changes_no_lease_and_the_next_process_takes_the_worker_over(env: Env) -> None:
    server = env.server()
    lease = httpx.post(
        f"{server.url}/v1/leases", json={"profile": "small", "ttl_s": 120}, headers=env.headers
    ).json()
    wait_active(server.url, env.headers, lease["id"])
    [pid] = env.worker_pids()
    server.stop()
    # uvicorn re-raises SIGTERM after a clean shutdown, so -15 is a clean exit too.
    assert server.proc is not None
    assert server.proc.returncode in (0, -15), server.log()
    assert alive(pid), "a replica's SIGTERM must not stop the worker"
    [row] = env.rows(contexts)
    assert row["state"] == "running"
    assert row["claimed_by"] is None, "a replica gives its claims up when it exits"

    again = env.server()
    r = httpx.post(f"{again.url}/v1/leases/{lease['id']}/heartbeat", headers=env.headers)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "active"

    def taken_over() -> bool:
        [row] = env.rows(contexts)
        return bool(row["host_replica"] and row["claimed_by"] == row["host_replica"])

    wait_until(taken_over, what="the new process to take the worker over")
    assert env.worker_pids() == [pid]
    again.stop()
    os.kill(pid, 9)  # left running by design; the test must not leave it behind


def test_pclease_shutdown_stops_every_context_and_its_worker(env: Env) -> None:
    server = env.server()
    lease = httpx.post(
        f"{server.url}/v1/leases", json={"profile": "small"}, headers=env.headers
    ).json()
    wait_active(server.url, env.headers, lease["id"])
    [pid] = env.worker_pids()
    out = run_cli(env.config, "shutdown")
    assert "shutdown requested" in out

    def stopped() -> bool:
        [row] = env.rows(contexts)
        return bool(row["state"] == "stopped")

    wait_until(stopped, what="the context to stop")
    assert not alive(pid)
    [row] = env.rows(contexts)
    assert row["stop_reason"] == "the service is shutting down"
    assert row["stop_kind"] == "shutdown"
    r = httpx.get(f"{server.url}/v1/leases/{lease['id']}", headers=env.headers)
    assert r.status_code == 200
    assert r.json()["state"] == "revoked"
    server.stop()
    assert server.proc is not None
    assert server.proc.returncode in (0, -15), server.log()


def test_a_killed_worker_fails_its_context_and_the_next_lease_gets_a_new_one(env: Env) -> None:
    server = env.server()
    lease = httpx.post(
        f"{server.url}/v1/leases", json={"profile": "small"}, headers=env.headers
    ).json()
    wait_active(server.url, env.headers, lease["id"])
    [pid] = env.worker_pids()
    os.kill(pid, 9)

    def failed() -> bool:
        return bool(
            httpx.get(f"{server.url}/v1/leases/{lease['id']}", headers=env.headers).json()["state"]
            == "failed"
        )

    wait_until(failed, what="the lease to see its context fail")
    ended = httpx.get(f"{server.url}/v1/leases/{lease['id']}", headers=env.headers).json()
    assert "signal 9" in ended["end_reason"] or "SIGKILL" in ended["end_reason"]
    fresh = httpx.post(
        f"{server.url}/v1/leases", json={"profile": "small"}, headers=env.headers
    ).json()
    assert fresh["context_id"] != lease["context_id"]
    assert wait_active(server.url, env.headers, fresh["id"])["state"] == "active"
