"""Three real replicas (local backend, each with a data directory of its own, as on three
machines; plans and results in the database) on one PostgreSQL database behind devkit's
balancer: one actor per context, drains that nobody notices."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from sqlalchemy import select

from devkit.airflow_deployment import create_database, drop_database
from devkit.live import wait_for
from devkit.replicas import ReplicaSet
from pclease_client import PcleaseClient
from pclease_service.db.engine import create_db_engine
from pclease_service.db.schema import contexts, queries

pytestmark = [pytest.mark.live, pytest.mark.postgres]

PROFILES = {"small": {"cpus": 1, "memory_gb": 1, "idle_grace_s": 60, "max_leases_per_context": 50}}
SETTINGS = {
    "backend": "local",
    "reconcile_interval_s": 0.2,
    "health_check_interval_s": 0.5,
    "replica_heartbeat_s": 0.5,
    "replica_ttl_s": 6,
    "lease_ttl_min_s": 1,
    "storage": {"kind": "database"},
}


class Recording(httpx.BaseTransport):
    """Every answer the client got, by status (retried ones included)."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.statuses: Counter[int] = Counter()
        self.codes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        with self._lock:
            self.statuses[response.status_code] += 1
            if response.status_code >= 500:
                response.read()
                self.codes[str(response.json().get("error", {}).get("code"))] += 1
        return response

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ReplicaSet]:
    url = create_database("pclease_rep")
    try:
        with ReplicaSet(
            tmp_path, database_url=url, profiles=PROFILES, settings=SETTINGS
        ) as replicas:
            yield replicas
            replicas.cli("shutdown")  # stop the workers the test started
            wait_for(lambda: not _rows(url, contexts, live=True), what="every context stopped")
    finally:
        drop_database(url)


def _rows(url: str, table: Any, *, live: bool = False) -> list[dict[str, Any]]:
    engine = create_db_engine(url, pool_size=1)
    try:
        stmt = select(table)
        if live:
            stmt = stmt.where(table.c.state.in_(["starting", "running", "idle", "stopping"]))
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]
    finally:
        engine.dispose()


def _frame(i: int) -> pl.LazyFrame:
    return pl.LazyFrame({"a": list(range(1000)), "b": [i] * 1000}).select(
        pl.col("a").sum(), pl.col("b").first()
    )


def test_a_cold_burst_spread_over_the_replicas_starts_exactly_one_context(
    fleet: ReplicaSet,
) -> None:
    auth = {"Authorization": f"Bearer {fleet.token('airflow', 'lease')}"}

    def lease(i: int) -> httpx.Response:
        # A new connection each: the balancer hands them to the replicas in turn.
        return httpx.post(
            f"{fleet.url}/v1/leases",
            json={"profile": "small", "holder": {"dag_id": "burst", "task_id": str(i)}},
            headers={**auth, "Idempotency-Key": f"burst-{i}"},
            timeout=60,
        )

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lease, range(24)))
    assert [r.status_code for r in answers] == [201] * 24, [r.text for r in answers]
    assert {r.json()["context_id"] for r in answers} == {answers[0].json()["context_id"]}
    served = [fleet.balancer.connections.get(port, 0) for port in fleet.ports()]
    assert all(n >= 6 for n in served), served

    def all_active() -> bool:
        states = {
            httpx.get(f"{fleet.url}/v1/leases/{r.json()['id']}", headers=auth).json()["state"]
            for r in answers
        }
        return states == {"active"}

    wait_for(all_active, 60, "every lease active")
    [context] = _rows(fleet.database_url, contexts)
    assert context["state"] == "running"
    assert context["fence"] == 1, "claimed once, by one replica"
    assert context["host_replica"] == context["claimed_by"]
    worker_dirs = [
        d for i in range(3) for d in (fleet.root / f"r{i + 1}" / "data").glob("local/workers/*")
    ]
    assert len(worker_dirs) == 1, worker_dirs


def test_a_rolling_restart_under_load_loses_no_lease_and_fails_no_query(
    fleet: ReplicaSet,
) -> None:
    token = fleet.token("airflow", "lease")
    transport = Recording()
    stop = threading.Event()
    done: Counter[str] = Counter()
    errors: list[str] = []

    def work(n: int) -> None:
        client = PcleaseClient(fleet.url, token, transport=transport, retries=8, backoff_s=0.25)
        try:
            holder = {"dag_id": "rolling", "run_id": "r", "task_id": str(n)}
            with client.lease("small", holder=holder, ttl_s=15) as lease:
                i = 0
                while not stop.is_set():
                    i += 1
                    out = lease.remote(_frame(i)).collect()
                    assert out["b"].to_list() == [i]
                    assert out["a"].to_list() == [499500]
                    done[f"w{n}"] += 1
                    time.sleep(0.05)
        except Exception as exc:  # noqa: BLE001: the test reports every failure
            errors.append(f"worker {n}: {type(exc).__name__}: {exc}")
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(done) == 4 or errors, 90, "every worker running queries")
    assert not errors, errors
    for i in range(3):
        before = sum(done.values())
        fleet.terminate(i)
        assert fleet.replicas[i].proc is not None
        assert fleet.replicas[i].proc.returncode in (0, -15), fleet.replicas[i].log()
        fleet.restart(i)
        port = fleet.replicas[i].port
        wait_for(lambda port=port: port in fleet.balancer.ready_ports(), what="back in rotation")
        wait_for(lambda before=before: sum(done.values()) > before + 4, 60, "progress")
        assert not errors, errors
    stop.set()
    for t in threads:
        t.join(60)
    assert not errors, [*errors, fleet.logs()[-20000:]]
    assert sum(done.values()) > 20
    unexpected = {s: n for s, n in transport.statuses.items() if s >= 500}
    assert set(transport.codes) <= {"draining"}, (unexpected, transport.codes)
    states = Counter(r["state"] for r in _rows(fleet.database_url, queries))
    assert set(states) == {"succeeded"}, states
    leases = httpx.get(
        f"{fleet.url}/v1/leases", headers={"Authorization": f"Bearer {token}"}
    ).json()
    assert {lease["state"] for lease in leases["leases"]} == {"released"}, leases


def test_a_replica_started_or_stopped_while_queries_run_changes_none_of_them(
    fleet: ReplicaSet,
) -> None:
    token = fleet.token("airflow", "lease")
    slow = (
        pl.LazyFrame()
        .select(pl.int_range(0, 4_000_000).shuffle(seed=7).alias("a"))
        .sort("a")
        .select(pl.col("a").max())
    )

    def one_runs() -> bool:
        return any(r["state"] == "running" for r in _rows(fleet.database_url, queries))

    with (
        PcleaseClient(fleet.url, token, retries=8, backoff_s=0.25) as client,
        client.lease("small", holder={"dag_id": "steady"}, ttl_s=30) as lease,
        ThreadPoolExecutor(4) as pool,
    ):
        running = [pool.submit(lambda: lease.remote(slow).collect()) for _ in range(4)]
        wait_for(one_runs, 60, "a query running")
        fleet.terminate(2)  # a replica stops while they run
        fleet.restart(2)  # and one starts while they run
        results = [f.result(timeout=180) for f in running]
    assert [r["a"].to_list() for r in results] == [[3_999_999]] * 4
    states = Counter(r["state"] for r in _rows(fleet.database_url, queries))
    assert states == {"succeeded": 4}, states


def test_serve_workers_runs_replicas_on_one_port(tmp_path: Path) -> None:
    from devkit.live import LiveServer, write_config
    from pclease_service.db.schema import replicas

    url = create_database("pclease_workers")
    try:
        config = write_config(
            tmp_path / "pclease.toml",
            {"database_url": url, "data_dir": str(tmp_path / "data"), **SETTINGS},
            PROFILES,
        )
        server = LiveServer(config, tmp_path / "serve.log", serve_args=("--workers", "2"))
        server.start(60)
        try:
            serving = wait_for(
                lambda: (
                    [r for r in _rows(url, replicas) if r["state"] == "serving"]
                    if len(_rows(url, replicas)) == 2
                    else None
                ),
                30,
                "two replicas serving",
            )
            assert len({r["pid"] for r in serving}) == 2
            for _ in range(6):
                assert httpx.get(f"{server.url}/readyz").status_code == 200
        finally:
            server.stop()
        assert server.proc is not None
        assert server.proc.returncode == 0, server.log()
        assert {r["state"] for r in _rows(url, replicas)} == {"stopped"}
    finally:
        drop_database(url)
