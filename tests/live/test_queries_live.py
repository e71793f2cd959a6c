"""Queries end to end: a real server, real local workers, real files, the real client."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from devkit.live import LiveServer, run_cli, write_config
from pclease_client import (
    ApiError,
    LeaseEnded,
    LeaseLost,
    LeaseState,
    PcleaseClient,
    QueryFailed,
    QueryState,
    build_submission,
    calls,
)
from pclease_client.errors import PlanRefusal, PlanRefused

pytestmark = pytest.mark.live


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.data = tmp_path / "lake"
        self.data.mkdir()
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.config = write_config(
            tmp_path / "pclease.toml",
            {
                "data_dir": str(tmp_path / "svc"),
                "database_url": f"sqlite:///{tmp_path / 'svc.db'}",
                "backend": "local",
                "reconcile_interval_s": 0.2,
                "lease_ttl_min_s": 1,
            },
            {
                "small": {
                    "cpus": 1,
                    "memory_gb": 1,
                    "idle_grace_s": 30,
                    "data_roots": [str(self.data)],
                },
            },
        )
        run_cli(self.config, "db", "upgrade")
        token = run_cli(self.config, "token", "create", "q", "--scope", "lease").strip()
        self.admin_token = run_cli(
            self.config, "token", "create", "ops", "--scope", "admin"
        ).strip()
        self.server = LiveServer(self.config, tmp_path / "server.log").start()
        self.client = PcleaseClient(self.server.url, token, retries=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("queries"))
    yield environment
    environment.client.close()
    environment.server.stop()


@pytest.fixture
def lease(env: Env) -> Iterator[Any]:
    with env.client.lease("small", holder={"dag_id": "t", "task_id": "q"}, ttl_s=30) as held:
        yield held


def frame() -> pl.DataFrame:
    return pl.DataFrame(
        {"id": [1, 2, 3, 4], "city": ["a", "b", "a", "c"], "amount": [10.0, 2.5, 7.5, 1.0]}
    )


@pytest.mark.parametrize("fmt", ["parquet", "csv", "ipc", "ndjson"])
def test_every_sink_format_writes_the_right_rows(env: Env, lease: Any, fmt: str) -> None:
    source = env.data / f"in-{fmt}.parquet"
    frame().write_parquet(source)
    out = env.data / f"out.{fmt}"
    lf = pl.scan_parquet(source).filter(pl.col("amount") > 2).select("id", "city")
    query = getattr(lease.remote(lf), f"sink_{fmt}")(str(out))
    assert query.state is QueryState.SUCCEEDED
    assert query.rows == 3
    read = {
        "parquet": pl.read_parquet,
        "csv": pl.read_csv,
        "ipc": pl.read_ipc,
        "ndjson": pl.read_ndjson,
    }[fmt]
    assert read(out).sort("id").to_dicts() == [
        {"id": 1, "city": "a"},
        {"id": 2, "city": "b"},
        {"id": 3, "city": "a"},
    ]


def test_collect_returns_the_frame(env: Env, lease: Any) -> None:
    source = env.data / "collect.parquet"
    frame().write_parquet(source)
    lf = pl.scan_parquet(source).group_by("city").agg(pl.col("amount").sum()).sort("city")
    result = lease.remote(lf).collect()
    assert result.to_dicts() == [
        {"city": "a", "amount": 17.5},
        {"city": "b", "amount": 2.5},
        {"city": "c", "amount": 1.0},
    ]


def test_a_large_result_streams_to_a_file_and_a_frame(
    env: Env, lease: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = calls.RESULT_IN_MEMORY_MAX_BYTES // 8  # two Int64 columns: about twice the size
    lf = pl.LazyFrame().select(i=pl.int_range(rows, dtype=pl.Int64), x=pl.lit(3, pl.Int64))
    query = env.client.wait_query(env.client.submit(lease.id, build_submission(lf, "collect")).id)
    assert query.result_bytes is not None
    assert query.result_bytes > calls.RESULT_IN_MEMORY_MAX_BYTES
    size = env.client.download_result(query.id, tmp_path / "result.arrow")
    assert size == query.result_bytes == (tmp_path / "result.arrow").stat().st_size
    expected = lf.collect()
    assert pl.read_ipc(tmp_path / "result.arrow").equals(expected)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    assert env.client.result_frame(query.id).equals(expected)
    assert list(spill.iterdir()) == []


def test_a_failure_carries_polars_error(env: Env, lease: Any) -> None:
    source = env.data / "fail.parquet"
    frame().write_parquet(source)
    with pytest.raises(QueryFailed) as caught:
        lease.remote(pl.scan_parquet(source).select("no_such_column")).collect()
    assert caught.value.error_type == "ColumnNotFoundError"
    assert "no_such_column" in caught.value.message
    assert isinstance(caught.value.as_polars_error(), pl.exceptions.ColumnNotFoundError)


def test_paths_outside_the_data_roots_are_refused_without_running(env: Env, lease: Any) -> None:
    secret = env.outside / "secret.parquet"
    frame().write_parquet(secret)
    with pytest.raises(PlanRefused) as scan:
        lease.remote(pl.scan_parquet(secret)).collect()
    assert (scan.value.status, scan.value.code) == (422, "plan_refused")
    assert scan.value.refusal is PlanRefusal.REFUSED
    assert str(secret) in scan.value.message

    target = env.outside / "escape.parquet"
    sneaky = str(env.data / ".." / "outside" / "escape.parquet")
    with pytest.raises(PlanRefused) as sink:
        lease.remote(pl.LazyFrame({"a": [1]})).sink_parquet(sneaky)
    assert sink.value.code == "plan_refused"
    assert not target.exists()

    with pytest.raises(PlanRefused) as own:
        lease.remote(pl.scan_csv(env.config)).collect()
    assert own.value.code == "plan_refused"
    assert env.client.get_lease(lease.id).state is LeaseState.ACTIVE  # nothing else was harmed


def test_python_udfs_are_refused_before_anything_runs(env: Env, lease: Any) -> None:
    marker = env.data / "udf-ran"

    def touch(x: int) -> int:
        marker.write_text("ran")
        return x

    lf = pl.LazyFrame({"a": [1]}).select(pl.col("a").map_elements(touch, return_dtype=pl.Int64))
    with pytest.raises(PlanRefused) as caught:
        lease.remote(lf).collect()
    assert caught.value.status == 422
    assert caught.value.code == "python_udf_refused"
    assert not marker.exists()


def test_malformed_plans_get_422_and_the_worker_survives(env: Env, lease: Any) -> None:
    good = build_submission(pl.LazyFrame({"a": [1]}), "collect")
    for damaged in (good.plan[: len(good.plan) // 2], b"DSL_VERSION" + os.urandom(200)):
        with pytest.raises(ApiError) as caught:
            env.client.submit(lease.id, type(good)(damaged, good.options))
        assert caught.value.status == 422
    assert lease.remote(pl.LazyFrame({"a": [1, 2]})).collect().height == 2


def test_cancellation_stops_a_running_query(env: Env, lease: Any) -> None:
    # A streaming cross join of 10^10 rows: minutes of CPU, little memory.
    a = pl.LazyFrame().select(x=pl.int_range(0, 100_000))
    slow = (
        a.join(a.select(y=pl.col("x")), how="cross")
        .filter((pl.col("x") * 7 + pl.col("y")) % 13 == 0)
        .select(pl.len())
    )
    query = env.client.submit(lease.id, build_submission(slow, "collect"))
    for _ in range(50):
        state = env.client.get_query(query.id, wait_s=0.2).state
        if state is QueryState.RUNNING:
            break
    assert state is QueryState.RUNNING
    started = time.monotonic()
    env.client.cancel_query(query.id)
    final = env.client.get_query(query.id, wait_s=20)
    assert final.state is QueryState.CANCELLED
    assert final.error is not None
    assert final.error.type == "Cancelled"
    assert time.monotonic() - started < 5
    assert lease.remote(pl.LazyFrame({"a": [1]})).collect().height == 1


def test_a_query_on_an_ended_lease_is_refused(env: Env) -> None:
    with env.client.lease("small", ttl_s=30) as held:
        pass
    with pytest.raises(LeaseEnded) as caught:
        env.client.submit(held.id, build_submission(pl.LazyFrame({"a": [1]}), "collect"))
    assert caught.value.status == 410


def test_the_client_notices_a_lease_revoked_underneath_it(env: Env) -> None:
    admin = PcleaseClient(env.server.url, env.admin_token, retries=1)
    with env.client.lease("small", ttl_s=3) as held:
        admin.stop_context(held.context_id)
        deadline = time.monotonic() + 10
        while held.lost is None and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(LeaseLost, match="revoked"):
            held.check()
        with pytest.raises(LeaseLost):
            held.remote(pl.LazyFrame({"a": [1]})).collect()
    admin.close()


def slow_frame() -> pl.LazyFrame:
    a = pl.LazyFrame().select(x=pl.int_range(0, 100_000))
    return (
        a.join(a.select(y=pl.col("x")), how="cross")
        .filter((pl.col("x") * 7 + pl.col("y")) % 13 == 0)
        .select(pl.len())
    )


def test_a_lease_ended_mid_query_cancels_it_and_says_why(env: Env) -> None:
    admin = PcleaseClient(env.server.url, env.admin_token, retries=1)
    outcome: list[BaseException] = []
    with env.client.lease("small", ttl_s=30) as held:

        def run() -> None:
            try:
                held.remote(slow_frame()).collect()
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        query = None
        for _ in range(100):
            listed = admin.list_queries(held.id)
            query = next((q for q in listed if q.state is QueryState.RUNNING), None)
            if query:
                break
            time.sleep(0.1)
        assert query is not None
        admin.stop_context(held.context_id)
        worker.join(30)
        assert not worker.is_alive()
    admin.close()
    (error,) = outcome
    assert isinstance(error, LeaseLost)
    assert error.state is LeaseState.REVOKED
    assert env.client.get_query(query.id).state is QueryState.CANCELLED


def test_the_watchdog_releases_the_lease_of_a_killed_process(env: Env) -> None:
    """SIGKILL leaves no chance to release: the lease's watchdog process does it."""
    script = (
        "import sys, time\n"
        "from pclease_client import PcleaseClient\n"
        "client = PcleaseClient(sys.argv[1], sys.argv[2])\n"
        "with client.lease('small', ttl_s=60) as lease:\n"
        "    print(lease.id, flush=True)\n"
        "    time.sleep(120)\n"
    )
    token = run_cli(env.config, "token", "create", "doomed", "--scope", "lease").strip()
    admin = PcleaseClient(env.server.url, env.admin_token, retries=1)
    holder = subprocess.Popen(
        [sys.executable, "-c", script, env.server.url, token], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None
        lease_id = holder.stdout.readline().strip()
        assert admin.get_lease(lease_id).state is LeaseState.ACTIVE
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    lease = admin.get_lease(lease_id, wait_s=10, while_state=LeaseState.ACTIVE)
    admin.close()
    assert lease.state is LeaseState.RELEASED  # not expired: its TTL is a minute


def test_a_lease_ended_normally_stops_its_watchdog(env: Env) -> None:
    with env.client.lease("small", ttl_s=30) as held:
        watchdog = held._watchdog
        assert watchdog is not None
        pid = watchdog.pid
        assert Path(f"/proc/{pid}").exists()
    assert held._watchdog is None
    assert not Path(f"/proc/{pid}").exists()  # exited, and reaped
