"""Queries side by side on one context: a real server, real local workers, and a Python UDF
(tests/live/stamps.py) that records in each executor when its query ran. Overlap is read
from those recorded intervals, never from durations."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from devkit.live import LiveServer, run_cli, write_config
from pclease_client import PcleaseClient, QueryInfo, QueryState, build_submission
from tests.live.stamps import intervals, stamp

pytestmark = pytest.mark.live

HOLDER = {"dag_id": "concurrency", "task_id": "five"}


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        shape = {"cpus": 1, "idle_grace_s": 30, "allow_python_udfs": True}
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
                "wide": {**shape, "memory_gb": 2.5, "concurrent_queries": 5},
                "narrow": {**shape, "memory_gb": 1},
            },
        )
        run_cli(self.config, "db", "upgrade")
        token = run_cli(self.config, "token", "create", "c", "--scope", "lease").strip()
        self.server = LiveServer(self.config, tmp_path / "server.log").start()
        self.client = PcleaseClient(self.server.url, token, retries=1)

    def submit_five(self, lease_id: str, tag: str, sleep_s: float) -> list[QueryInfo]:
        """Five stamped queries, submitted one after the other (their submission order)."""
        path = str(self.tmp / f"{tag}.stamps")
        submitted = []
        for i in range(5):
            udf = functools.partial(stamp, path=path, label=f"{tag}{i}", sleep_s=sleep_s)
            lf = pl.LazyFrame({"a": [i]}).select(
                pl.col("a").map_batches(udf, return_dtype=pl.Int64)
            )
            submitted.append(self.client.submit(lease_id, build_submission(lf, "collect")))
        return submitted

    def finish(self, queries: list[QueryInfo]) -> list[QueryInfo]:
        return [self.client.wait_query(q.id, timeout_s=180) for q in queries]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("concurrency"))
    yield environment
    environment.client.close()
    environment.server.stop()


def test_five_queries_overlap_when_the_profile_allows_five(env: Env) -> None:
    with env.client.lease("wide", holder=HOLDER, ttl_s=60) as lease:
        # A first round makes sure all five executors have warmed up.
        env.finish(env.submit_five(lease.id, "warm", 0.1))
        done = env.finish(env.submit_five(lease.id, "q", 1.5))
    ran = intervals(str(env.tmp / "q.stamps"))
    assert sorted(ran) == [f"q{i}" for i in range(5)]
    starts = [start for start, _, _ in ran.values()]
    ends = [end for _, end, _ in ran.values()]
    # Every interval overlaps every other: all five were running at one moment.
    assert max(starts) < min(ends), ran
    assert len({pid for _, _, pid in ran.values()}) == 5  # five executors
    assert all(q.state is QueryState.SUCCEEDED for q in done)
    started = [q.started_at for q in done]
    finished = [q.finished_at for q in done]
    assert None not in started and None not in finished
    assert max(started) < min(finished)  # type: ignore[type-var]


def test_with_one_at_a_time_the_five_queue_and_run_in_submission_order(env: Env) -> None:
    with env.client.lease("narrow", holder=HOLDER, ttl_s=60) as lease:
        submitted = env.submit_five(lease.id, "n", 1.0)
        # One read, so the places are of one moment (newest first in the listing).
        seen = {q.id: q for q in env.client.list_queries(lease.id)}
        done = env.finish(submitted)
    # Those still waiting stood in line in the order they came: 1, 2, 3, ...
    snapshot = [seen[q.id] for q in submitted]
    waiting = [q for q in snapshot if q.state is QueryState.QUEUED]
    assert len(waiting) >= 3, snapshot
    assert waiting == snapshot[len(snapshot) - len(waiting) :]
    assert [q.queue_position for q in waiting] == list(range(1, len(waiting) + 1))
    assert all(q.queued_s is not None for q in waiting)

    ran = intervals(str(env.tmp / "n.stamps"))
    order = [ran[f"n{i}"] for i in range(5)]
    for (_, end, _), (start, _, _) in itertools.pairwise(order):
        assert end <= start, ran  # one after the other, oldest first
    assert len({pid for _, _, pid in order}) == 1  # one executor
    started = [q.started_at for q in done]
    assert started == sorted(started)  # type: ignore[type-var]
    assert all(q.queue_position is None for q in done)
    assert [q.queued_s is not None and q.queued_s >= 0 for q in done] == [True] * 5
