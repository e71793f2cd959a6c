"""Every option a query accepts does something, or is refused. A context runs its
profile's concurrent_queries at once; the rest wait in submission order, with their place
and wait on the query and the dashboard. ``distributed`` is refused where it cannot run,
``destination`` where it is not where the plan writes. (The memory backend runs nothing;
real concurrency is in tests/live/test_concurrency_live.py, distributed runs in
tests/live/test_polars_cloud_queries_live.py.)"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import polars as pl
import pytest

from pclease_client import build_submission
from pclease_service import store
from pclease_service.db.tx import Tx
from tests.api.test_dashboard import signed_in
from tests.harness import PROFILES, Harness


def options(**extra: Any) -> dict[str, Any]:
    return {"target": "collect", "polars_version": pl.__version__, **extra}


async def submit(h: Harness, lease_id: str, **extra: Any) -> Any:
    sub = build_submission(pl.LazyFrame({"a": [1]}), "collect")
    return await h.client.post(
        f"/v1/leases/{lease_id}/queries",
        files={"plan": ("plan.bin", sub.plan)},
        data={"options": json.dumps(options(**extra))},
        headers=h.headers,
    )


async def get(h: Harness, query_id: str) -> dict[str, Any]:
    response = await h.client.get(f"/v1/queries/{query_id}", headers=h.headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def sent(h: Harness, n: int) -> set[str]:
    """The ids of the queries the backend was given, once it has been given ``n`` (each
    runs in a task of its own, which reaches the backend after a database read)."""
    for _ in range(500):
        if len(h.backend.executed) >= n:
            break
        await asyncio.sleep(0.01)
    return {spec.query_id for spec in h.backend.executed}


async def active_lease(h: Harness) -> dict[str, Any]:
    lease = await h.lease()
    await h.settle()
    return await h.get_lease(lease["id"])


async def test_queries_beyond_concurrent_queries_wait_in_submission_order(
    make_harness: Any,
) -> None:
    profiles = {**PROFILES, "small": {**PROFILES["small"], "concurrent_queries": 2}}
    h: Harness = await make_harness(profiles=profiles)
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    submitted = []
    for _ in range(5):
        response = await submit(h, lease["id"])
        assert response.status_code == 202, response.text
        submitted.append(response.json())
        h.clock.advance(1)
    # Nothing ran yet: all five wait, in the order they came.
    assert [q["queue_position"] for q in submitted] == [1, 2, 3, 4, 5]
    assert [q["queued_s"] for q in submitted] == [0.0] * 5

    await h.tick()
    ids = [q["id"] for q in submitted]
    states = [await get(h, qid) for qid in ids]
    assert [q["state"] for q in states] == ["running", "running", "queued", "queued", "queued"]
    assert [q["queue_position"] for q in states] == [None, None, 1, 2, 3]
    assert [q["queued_s"] for q in states] == [5.0, 4.0, 3.0, 2.0, 1.0]  # so far, or until run
    assert await sent(h, 2) == set(ids[:2])

    client = await signed_in(h, "read")
    page = await client.get(f"/ui/contexts/{lease['context_id']}")
    assert page.status_code == 200
    assert "#1 in queue" in page.text and "#3 in queue" in page.text
    await client.aclose()

    # The gate lets every running query finish; the next two go, oldest first.
    h.backend.query_gate.set()
    await h.service.runner.drain()
    h.backend.query_gate = asyncio.Event()
    h.clock.advance(10)
    await h.tick()
    states = [await get(h, qid) for qid in ids]
    assert [q["state"] for q in states] == [
        "succeeded",
        "succeeded",
        "running",
        "running",
        "queued",
    ]
    assert [q["queue_position"] for q in states] == [None, None, None, None, 1]
    assert states[2]["queued_s"] == 13.0
    assert await sent(h, 4) == set(ids[:4])
    h.backend.query_gate.set()
    await h.service.runner.drain()
    await h.tick()
    await h.service.runner.drain()
    assert [(await get(h, qid))["state"] for qid in ids] == ["succeeded"] * 5


async def test_the_limit_holds_in_sql_whoever_starts_the_query(h: Harness) -> None:
    """Two runners (replicas) cannot both take a context's last slot."""
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    first = (await submit(h, lease["id"])).json()
    second = (await submit(h, lease["id"])).json()

    def start(query_id: str) -> Any:
        def unit(tx: Tx) -> Any:
            return store.queries.start_query(tx, query_id, limit=1, actor="runner-b", replica="b")

        return h.service.db.write_sync(unit)

    started, _ = start(first["id"])
    assert started is not None and started.state.value == "running"
    refused, _ = start(second["id"])
    assert refused is None
    assert (await get(h, second["id"]))["queue_position"] == 1
    h.backend.query_gate.set()


async def test_one_node_queries_are_recorded_as_such(h: Harness) -> None:
    lease = await active_lease(h)
    for extra in ({}, {"distributed": False}, {"distributed": None}):
        response = await submit(h, lease["id"], **extra)
        assert response.status_code == 202, response.text
        assert response.json()["distributed"] is None


@pytest.mark.parametrize(
    ("distributed", "says"),
    [
        (True, "the memory backend runs every query on one node"),
        ({"max_workers": 2}, "the memory backend runs every query on one node"),
        ("yes", "options.distributed: must be true, false or an object of distributed settings"),
        ({"bogus": 1}, "options.distributed.bogus: unknown option; remove it"),
        ({"min_workers": "2"}, "options.distributed.min_workers: Input should be a valid integer"),
        (
            {"shuffle_compression_level": 3},
            "options.distributed: shuffle_compression_level only applies to "
            "shuffle_compression = 'zstd'",
        ),
    ],
)
async def test_distributed_queries_are_refused_where_they_cannot_run(
    h: Harness, distributed: Any, says: str
) -> None:
    lease = await active_lease(h)
    response = await submit(h, lease["id"], distributed=distributed)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_input"
    assert says in response.json()["error"]["message"]


async def test_a_destination_other_than_the_plans_sink_is_refused(
    make_harness: Any, tmp_path: Any
) -> None:
    profiles = {**PROFILES, "small": {**PROFILES["small"], "data_roots": [str(tmp_path)]}}
    h: Harness = await make_harness(profiles=profiles)
    lease = await active_lease(h)
    sink = str(tmp_path / "out.parquet")
    sub = build_submission(pl.LazyFrame({"a": [1]}), "parquet", sink)

    async def send(destination: str) -> Any:
        return await h.client.post(
            f"/v1/leases/{lease['id']}/queries",
            files={"plan": ("plan.bin", sub.plan)},
            data={"options": json.dumps({**sub.options, "destination": destination})},
            headers=h.headers,
        )

    elsewhere = await send(str(tmp_path / "elsewhere.parquet"))
    assert elsewhere.status_code == 422, elsewhere.text
    assert elsewhere.json()["error"]["message"] == (
        f"options.destination is {str(tmp_path / 'elsewhere.parquet')!r}, but the plan "
        f"writes to {sink!r}; send the sink's own path as destination"
    )
    same = await send(sink)
    assert same.status_code == 202, same.text
    assert same.json()["destination"] == sink
