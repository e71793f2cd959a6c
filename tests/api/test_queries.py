"""Query lifecycle through the API, with a fake clock and the memory backend (which runs
nothing): states, cancellation, lease rules, plan checks. Real execution is in
test_queries_live.py."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import polars as pl
import pytest
from sqlalchemy import update

from pclease_client import build_submission
from pclease_client.plans import Submission
from pclease_service.backends.base import QueryOutcome
from pclease_service.db import schema
from pclease_service.store import replicas
from tests.harness import PROFILES, Harness


def plan(target: str = "collect", destination: str | None = None, **kw: Any) -> Submission:
    lf = pl.LazyFrame({"a": [1, 2, 3]}).with_columns(b=pl.col("a") * 2)
    return build_submission(lf, target, destination, **kw)  # type: ignore[arg-type]


def opaque_udf(x: int) -> int:
    return int(str(x)) + 1


async def submit(
    h: Harness, lease_id: str, sub: Submission | None = None, headers: dict[str, str] | None = None
) -> Any:
    sub = sub or plan()
    return await h.client.post(
        f"/v1/leases/{lease_id}/queries",
        files={"plan": ("plan.bin", sub.plan)},
        data={"options": json.dumps(sub.options)},
        headers=headers or h.headers,
    )


async def query(h: Harness, query_id: str) -> dict[str, Any]:
    r = await h.client.get(f"/v1/queries/{query_id}", headers=h.headers)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def active_lease(h: Harness, **body: Any) -> dict[str, Any]:
    lease = await h.lease(**body)
    await h.settle()
    return await h.get_lease(lease["id"])


async def test_a_query_runs_on_an_active_lease_and_succeeds(h: Harness) -> None:
    h.backend.query_outcome = QueryOutcome(ok=True, rows=3, result_bytes=10)
    lease = await active_lease(h)
    response = await submit(h, lease["id"])
    assert response.status_code == 202, response.text
    q = response.json()
    assert q["state"] == "queued"
    assert response.headers["Location"] == f"/v1/queries/{q['id']}"
    await h.tick()
    await h.service.runner.drain()
    done = await query(h, q["id"])
    assert done["state"] == "succeeded"
    assert done["rows"] == 3
    assert done["output"] == f"/v1/queries/{q['id']}/result"
    [spec] = h.backend.executed
    assert spec.plan == plan().plan  # the bytes the client sent, untouched
    assert spec.result_path is not None and spec.result_path.endswith(f"{q['id']}.arrow")
    events = (
        await h.client.get("/v1/events", params={"lease_id": lease["id"]}, headers=h.headers)
    ).json()["events"]
    moves = [(e["from_state"], e["to_state"]) for e in reversed(events) if e["kind"] == "query"]
    assert moves == [(None, "queued"), ("queued", "running"), ("running", "succeeded")]


async def test_a_submission_wakes_the_query_runner_and_a_tick_starts_it(h: Harness) -> None:
    lease = await active_lease(h)
    h.service.notifier.runner.clear()
    response = await submit(h, lease["id"])
    assert response.status_code == 202, response.text
    # The runner's loop waits on this event before its interval is up: it starts the
    # query now, not on its next scheduled tick.
    assert h.service.notifier.runner.is_set()
    await h.service.runner.tick()  # what the woken loop runs, without moving the clock
    assert (await query(h, response.json()["id"]))["state"] in ("running", "succeeded")
    await h.service.runner.drain()


async def test_the_runners_own_writes_wake_it_only_when_a_freed_slot_has_a_taker(
    h: Harness,
) -> None:
    gate = h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    wake = h.service.notifier.runner
    try:
        first = (await submit(h, lease["id"])).json()["id"]
        wake.clear()
        await h.service.runner.tick()  # starts it: a write of the runner's own
        assert (await query(h, first))["state"] == "running"
        assert not wake.is_set()

        second = (await submit(h, lease["id"])).json()["id"]
        wake.clear()
        await h.service.runner.tick()  # one query at a time: the second waits
        assert (await query(h, second))["state"] == "queued"
    finally:
        gate.set()
    await h.service.runner.drain()
    assert (await query(h, first))["state"] == "succeeded"
    assert wake.is_set()  # the first one's end frees the slot the second waits for
    wake.clear()
    await h.service.runner.tick()
    await h.service.runner.drain()
    assert (await query(h, second))["state"] == "succeeded"
    assert not wake.is_set()  # nothing waited for the second one's slot


async def test_a_query_waits_for_a_pending_lease(h: Harness) -> None:
    h.backend.boot_s = 10
    lease = await h.lease()
    q = (await submit(h, lease["id"])).json()
    await h.settle()
    assert (await query(h, q["id"]))["state"] == "queued"
    await h.tick(11)
    await h.tick()
    await h.service.runner.drain()
    assert (await query(h, q["id"]))["state"] == "succeeded"


async def test_failures_carry_the_error_type_and_message(h: Harness) -> None:
    h.backend.query_outcome = QueryOutcome(
        ok=False, error_type="ColumnNotFoundError", error_message='unable to find column "z"'
    )
    lease = await active_lease(h)
    q = (await submit(h, lease["id"])).json()
    await h.tick()
    await h.service.runner.drain()
    failed = await query(h, q["id"])
    assert failed["state"] == "failed"
    assert failed["error"] == {
        "type": "ColumnNotFoundError",
        "message": 'unable to find column "z"',
    }
    result = await h.client.get(f"/v1/queries/{q['id']}/result", headers=h.headers)
    assert result.status_code == 409


async def test_cancel_a_queued_and_a_running_query(h: Harness) -> None:
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    running = (await submit(h, lease["id"])).json()
    await h.tick()
    assert (await query(h, running["id"]))["state"] == "running"
    queued = (await submit(h, lease["id"])).json()
    cancelled = await h.client.post(f"/v1/queries/{queued['id']}/cancel", headers=h.headers)
    assert cancelled.json()["state"] == "cancelled"

    flagged = await h.client.post(f"/v1/queries/{running['id']}/cancel", headers=h.headers)
    assert flagged.json()["state"] == "running"  # the runner stops it
    await h.tick()
    await h.service.runner.drain()
    assert (await query(h, running["id"]))["state"] == "cancelled"
    assert h.backend.cancelled == [running["id"]]
    again = await h.client.post(f"/v1/queries/{running['id']}/cancel", headers=h.headers)
    assert again.status_code == 200  # cancelling an ended query is harmless


async def test_ending_a_lease_cancels_its_queries_and_refuses_new_ones(h: Harness) -> None:
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    running = (await submit(h, lease["id"])).json()
    await h.tick()
    queued = (await submit(h, lease["id"])).json()
    await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    assert (await query(h, queued["id"]))["state"] == "cancelled"
    await h.tick()
    await h.service.runner.drain()
    ended = await query(h, running["id"])
    assert ended["state"] == "cancelled"
    assert "released" in ended["error"]["message"]

    refused = await submit(h, lease["id"])
    assert refused.status_code == 410
    assert refused.json()["error"]["code"] == "lease_ended"


async def test_a_query_on_an_expired_lease_is_refused(h: Harness) -> None:
    lease = await active_lease(h, ttl_s=10)
    await h.tick(11)
    assert (await h.get_lease(lease["id"]))["state"] == "expired"
    refused = await submit(h, lease["id"])
    assert refused.status_code == 410
    assert "expired" in refused.json()["error"]["message"]
    assert h.backend.executed == []


async def test_a_running_query_keeps_its_lease_alive(h: Harness) -> None:
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h, ttl_s=10)
    q = (await submit(h, lease["id"])).json()
    await h.tick()
    await h.tick(60)  # far past the TTL, no heartbeat
    assert (await h.get_lease(lease["id"]))["state"] == "active"
    beat = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=h.headers)
    assert beat.status_code == 200
    h.backend.query_gate.set()
    await h.service.runner.drain()
    assert (await query(h, q["id"]))["state"] == "succeeded"
    await h.tick(9)  # the finished query gave the lease a full TTL
    assert (await h.get_lease(lease["id"]))["state"] == "active"
    await h.tick(2)
    assert (await h.get_lease(lease["id"]))["state"] == "expired"


async def test_python_udfs_are_refused_unless_the_profile_allows_them(make_harness: Any) -> None:
    lf = pl.LazyFrame({"a": [1]}).select(
        pl.col("a").map_elements(opaque_udf, return_dtype=pl.Int64)
    )
    udf = build_submission(lf, "collect")
    profiles = {**PROFILES, "trusted": {"cpus": 1, "memory_gb": 1, "allow_python_udfs": True}}
    h: Harness = await make_harness(profiles=profiles)
    lease = await active_lease(h)
    refused = await submit(h, lease["id"], udf)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "python_udf_refused"
    assert "allow_python_udfs" in refused.json()["error"]["message"]
    trusted = await active_lease(h, profile="trusted")
    assert (await submit(h, trusted["id"], udf)).status_code == 202


async def test_a_plan_from_another_polars_version_is_refused(h: Harness) -> None:
    lease = await active_lease(h)
    good = plan()
    header = len(b"DSL_VERSION") + 4
    foreign = good.plan[:header] + b"0" * 64 + good.plan[header + 64 :]
    options = {**good.options, "polars_version": "1.99.0"}
    refused = await submit(h, lease["id"], Submission(foreign, options))
    assert refused.status_code == 422
    error = refused.json()["error"]
    assert error["code"] == "plan_version_mismatch"
    assert "1.99.0" in error["message"] and pl.__version__ in error["message"]


async def test_truncated_and_padded_plans_are_refused(h: Harness) -> None:
    lease = await active_lease(h)
    good = plan()
    for damaged in (good.plan[:-7], good.plan + b"\x00\x01"):
        refused = await submit(h, lease["id"], Submission(damaged, good.options))
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "plan_invalid"
    assert h.backend.executed == []


async def test_plans_over_the_limit_get_413(make_harness: Any) -> None:
    h: Harness = await make_harness(max_plan_bytes=2048)
    lease = await active_lease(h)
    big = build_submission(pl.LazyFrame({"a": list(range(5000))}), "collect")
    response = await submit(h, lease["id"], big)
    assert response.status_code == 413
    assert "plan" in response.json()["error"]["message"]


async def test_running_queries_fail_only_when_the_replica_running_them_is_gone(
    h: Harness,
) -> None:
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    q = (await submit(h, lease["id"])).json()
    await h.tick()
    assert (await query(h, q["id"]))["state"] == "running"

    # Another replica starting (or this one's periodic check) leaves a live one's alone.
    await h.service.runner.recover()
    assert (await query(h, q["id"]))["state"] == "running"

    # Its replica stops heartbeating: after replica_ttl_s it counts as gone.
    other = "replica-that-dies"
    await h.service.db.write(
        lambda tx: (
            replicas.register(tx, other, host="elsewhere", pid=1),
            tx.conn.execute(
                update(schema.queries)
                .where(schema.queries.c.id == q["id"])
                .values(runner_replica=other)
            ),
        )
    )
    await h.service.runner.recover()
    assert (await query(h, q["id"]))["state"] == "running"
    h.clock.advance(h.service.settings.replica_ttl_s + 1)
    await h.service.liveness.tick()  # this replica is still alive
    await h.service.runner.recover()
    failed = await query(h, q["id"])
    assert failed["state"] == "failed"
    assert failed["error"]["type"] == "ServiceRestarted"
    h.backend.query_gate.set()


async def test_a_restart_under_the_same_replica_id_fails_its_own_earlier_queries(
    h: Harness,
) -> None:
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    q = (await submit(h, lease["id"])).json()
    await h.tick()
    assert (await query(h, q["id"]))["state"] == "running"
    await h.service.runner.recover(at_start=True)  # what a process under this id does first
    failed = await query(h, q["id"])
    assert failed["state"] == "failed"
    assert failed["error"]["type"] == "ServiceRestarted"
    h.backend.query_gate.set()


async def test_sink_queries_have_no_result_to_download(make_harness: Any, tmp_path: Any) -> None:
    root = str(tmp_path / "lake")
    h: Harness = await make_harness(profiles={"small": {**PROFILES["small"], "data_roots": [root]}})
    lease = await active_lease(h)
    sink = plan("parquet", f"{root}/out.parquet")
    q = (await submit(h, lease["id"], sink)).json()
    assert q["destination"] == f"{root}/out.parquet"
    await h.tick()
    await h.service.runner.drain()
    response = await h.client.get(f"/v1/queries/{q['id']}/result", headers=h.headers)
    assert response.status_code == 409
    assert "sink" in response.json()["error"]["message"]


async def test_paths_outside_the_data_roots_are_refused_at_submission(h: Harness) -> None:
    lease = await active_lease(h)  # "small" has no data_roots: no file may be touched
    response = await submit(h, lease["id"], plan("parquet", "/etc/pclease/out.parquet"))
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "plan_refused"
    assert "/etc/pclease/out.parquet" in error["message"]
    scan = build_submission(pl.scan_csv("/etc/passwd"), "collect")
    response = await submit(h, lease["id"], scan)
    assert response.status_code == 422
    assert "/etc/passwd" in response.json()["error"]["message"]
    assert h.backend.executed == []


async def test_other_tokens_cannot_see_or_cancel_a_query(h: Harness) -> None:
    lease = await active_lease(h)
    q = (await submit(h, lease["id"])).json()
    stranger = h.token("stranger", "lease")
    seen = await h.client.get(f"/v1/queries/{q['id']}", headers=stranger)
    assert seen.status_code == 404
    cancel = await h.client.post(f"/v1/queries/{q['id']}/cancel", headers=stranger)
    assert cancel.status_code == 404
    on_their_lease = await submit(h, lease["id"], headers=stranger)
    assert on_their_lease.status_code == 404
    reader = h.token("reader", "read")
    listed = await h.client.get(f"/v1/leases/{lease['id']}/queries", headers=reader)
    assert [x["id"] for x in listed.json()["queries"]] == [q["id"]]
    denied = await submit(h, lease["id"], headers=reader)
    assert denied.status_code == 403


async def test_long_poll_returns_when_the_query_ends(h: Harness) -> None:
    h.backend.query_gate = asyncio.Event()
    lease = await active_lease(h)
    q = (await submit(h, lease["id"])).json()
    await h.tick()
    parked = h.clock.sleeping
    waiter = asyncio.create_task(
        h.client.get(f"/v1/queries/{q['id']}", params={"wait_s": 10}, headers=h.headers)
    )
    await h.clock.sleepers(parked + 1)  # the long poll waits, on the service's clock
    assert not waiter.done()
    h.backend.query_gate.set()
    response = await asyncio.wait_for(waiter, 5)
    assert response.json()["state"] == "succeeded"


@pytest.mark.parametrize("target", ["parquet", "csv", "ipc", "ndjson"])
def test_client_builds_plans_for_every_sink(target: str) -> None:
    sub = plan(target, f"/data/out.{target}")
    assert sub.plan.startswith(b"DSL_VERSION")
    assert sub.options == {
        "target": target,
        "engine": "auto",
        "labels": {},
        "polars_version": pl.__version__,
        "destination": f"/data/out.{target}",
    }
    with pytest.raises(ValueError, match="needs a destination"):
        plan(target)


async def test_the_services_own_files_are_refused_even_inside_a_data_root(
    make_harness: Any, tmp_path: Any, database_url: str
) -> None:
    h: Harness = await make_harness(
        profiles={"small": {**PROFILES["small"], "data_roots": [str(tmp_path)]}}
    )
    lease = await active_lease(h)
    own_files = [tmp_path / "data" / "spool" / "anything.parquet"]
    if database_url.startswith("sqlite"):
        own_files.append(tmp_path / "pclease.db")
    for path in own_files:
        response = await submit(h, lease["id"], build_submission(pl.scan_csv(path), "collect"))
        assert response.status_code == 422, path
        assert response.json()["error"]["code"] == "plan_refused"
    allowed = await submit(h, lease["id"], plan("parquet", str(tmp_path / "lake" / "ok.parquet")))
    assert allowed.status_code == 202


async def test_a_query_reports_what_it_reads_and_writes(make_harness: Any, tmp_path: Any) -> None:
    """Lineage: every scan and the sink, once each, sorted, as the client named them; a URI
    without its query string (a presigned URL's signature); a collect writes nothing."""
    root = str(tmp_path / "lake")
    roots = [root, "s3://lake/"]
    h: Harness = await make_harness(profiles={"small": {**PROFILES["small"], "data_roots": roots}})
    lease = await active_lease(h)
    orders = pl.scan_parquet(
        "s3://lake/raw/orders.parquet?X-Amz-Signature=abc#v1", credential_provider=None
    )
    customers = pl.scan_csv(f"{root}/raw/customers.csv")
    joined = orders.join(customers, on="customer_id").join(customers, on="country")
    sink = build_submission(
        joined, "parquet", "s3://lake/joined/revenue.parquet", storage_options={"region": "x"}
    )
    response = await submit(h, lease["id"], sink)
    assert response.status_code == 202, response.text
    q = response.json()
    assert q["inputs"] == [f"{root}/raw/customers.csv", "s3://lake/raw/orders.parquet"]
    assert q["outputs"] == ["s3://lake/joined/revenue.parquet"]
    assert (await query(h, q["id"]))["inputs"] == q["inputs"]

    collect = build_submission(customers.select(pl.len()), "collect")
    response = await submit(h, lease["id"], collect)
    assert response.status_code == 202, response.text
    assert (response.json()["inputs"], response.json()["outputs"]) == (
        [f"{root}/raw/customers.csv"],
        [],
    )
    listed = await h.client.get(f"/v1/leases/{lease['id']}/queries", headers=h.headers)
    assert listed.status_code == 200
    assert {tuple(x["outputs"]) for x in listed.json()["queries"]} == {
        ("s3://lake/joined/revenue.parquet",),
        (),
    }
