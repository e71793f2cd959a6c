"""Queries on Polars Cloud through a real ``pclease serve``: distributed settings reach the
fake (which records them and still runs the plan for real), and a context keeps no more
queries in flight than its profile's concurrent_queries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pclease_client import DistributedInfo, QueryState, build_submission
from pclease_client.errors import InvalidInput
from tests.fakepc import FakePolarsCloud
from tests.live.test_polars_cloud_live import HOLDER, Env, cloud, fake, make_env, wait_until

pytestmark = pytest.mark.live
__all__ = ["cloud", "fake", "make_env"]  # the fixtures, shared with the other module


def settings_of(cloud: FakePolarsCloud, query_id: str) -> dict[str, Any]:
    [sent] = [q for q in cloud.queries() if f"pclease.query-id={query_id}" in q["labels"]]
    return dict(sent["settings"])


def test_distributed_queries_reach_polars_cloud_with_their_settings(
    make_env: Callable[..., Env], cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    env = make_env(
        profiles={
            "big": {
                "cpus": 2,
                "memory_gb": 4,
                "cluster_size": 3,
                "idle_grace_s": 1,
                "data_roots": [str(tmp_path / "lake")],
                "polars_cloud": {"distributed": {"max_workers": 3, "shuffle_format": "ipc"}},
            }
        }
    )
    server = env.server()
    lake = env.lake
    pl.DataFrame({"city": ["a", "b", "a"], "amount": [1, 2, 3]}).write_parquet(lake / "in.pq")
    totals = pl.scan_parquet(lake / "in.pq").group_by("city").agg(pl.col("amount").sum())
    with env.client(server) as client, client.lease("big", holder=HOLDER, ttl_s=30) as lease:
        out = lake / "totals.parquet"
        sunk = lease.remote(totals).distributed(min_workers=2, shuffle_compression="zstd")
        written = sunk.sink_parquet(str(out))
        assert written.state is QueryState.SUCCEEDED
        assert written.distributed == DistributedInfo.from_json(
            {
                **DistributedInfo.from_json(_DEFAULTS).to_json(),
                "min_workers": 2,
                "max_workers": 3,
                "shuffle_format": "ipc",
                "shuffle_compression": "zstd",
            }
        )
        sent = settings_of(cloud, written.id)
        assert sent["mode"] == "distributed"
        assert (sent["min_workers"], sent["max_workers"]) == (2, 3)
        assert (sent["shuffle_format"], sent["shuffle_compression"]) == ("ipc", "zstd")
        assert pl.read_parquet(out).sort("city").to_dicts() == [
            {"city": "a", "amount": 4},
            {"city": "b", "amount": 2},
        ]

        # Left unsaid, a multi-node profile runs distributed; .single_node() says otherwise.
        frame = lease.remote(totals.sort("city")).collect()
        assert frame.to_dicts() == [{"city": "a", "amount": 4}, {"city": "b", "amount": 2}]
        single = lease.remote(totals).single_node().sink_parquet(str(lake / "single.parquet"))
        assert single.distributed is None
        queries = client.list_queries(lease.id)
        by_id = {q.id: q for q in queries}
        modes = {q.id: settings_of(cloud, q.id)["mode"] for q in queries}
        assert modes[written.id] == "distributed" and modes[single.id] == "single-node"
        [collected] = [q for q in queries if q.id not in (written.id, single.id)]
        assert modes[collected.id] == "distributed"
        assert by_id[collected.id].distributed is not None

    with env.client(server) as client, client.lease("small", holder=HOLDER, ttl_s=30) as lease:
        with pytest.raises(InvalidInput) as refused:
            lease.remote(totals).distributed().collect()
        assert refused.value.status == 422
        assert "cluster_size = 1" in refused.value.message
        assert lease.remote(totals).collect().height == 2


_DEFAULTS = {
    "min_workers": None,
    "max_workers": None,
    "shuffle_compression": "auto",
    "shuffle_format": "auto",
    "shuffle_compression_level": None,
    "equi_join_broadcast_limit": 256 * 1024**2,
    "partitions_per_worker": None,
    "single_worker_ops": "auto",
    "expression_lowering": None,
}


def test_a_context_keeps_at_most_concurrent_queries_in_flight(
    make_env: Callable[..., Env], cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    env = make_env(
        profiles={
            "pair": {
                "cpus": 2,
                "memory_gb": 4,
                "idle_grace_s": 1,
                "concurrent_queries": 2,
                "data_roots": [str(tmp_path / "lake")],
            }
        }
    )
    server = env.server()
    cloud.query_delay_s = 1.0
    with env.client(server) as client, client.lease("pair", holder=HOLDER, ttl_s=30) as lease:
        lf = pl.LazyFrame({"a": [1, 2]})
        submitted = [client.submit(lease.id, build_submission(lf, "collect")) for _ in range(5)]
        done = [client.wait_query(q.id, timeout_s=60) for q in submitted]
    assert all(q.state is QueryState.SUCCEEDED for q in done)
    # What Polars Cloud saw: when each query arrived and when it ended.
    ran = [cloud_query(cloud, q.id) for q in submitted]
    events = sorted(
        [(q["started_at"], 1) for q in ran] + [(q["ended_at"], -1) for q in ran],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    in_flight, most = 0, 0
    for _, change in events:
        in_flight += change
        most = max(most, in_flight)
    assert most == 2
    arrived = [q["started_at"] for q in ran]
    assert arrived == sorted(arrived)  # sent in submission order


def cloud_query(cloud: FakePolarsCloud, query_id: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for q in cloud.queries():
            if f"pclease.query-id={query_id}" in q["labels"] and q["ended_at"] is not None:
                return dict(q)
        return None

    result: dict[str, Any] = wait_until(found, 10, f"query {query_id} on the fake")
    return result
