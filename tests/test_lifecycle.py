"""Every lifecycle rule, through the HTTP API, with a fake clock and the memory backend."""

from __future__ import annotations

from typing import Any

from pclease_service import store
from pclease_service.backends.base import LABEL_CONTEXT_ID, LABEL_INSTANCE, LABEL_MANAGED_BY
from tests.conftest import Harness

AIRFLOW_HOLDER = {
    "dag_id": "etl",
    "run_id": "r1",
    "task_id": "t1",
    "try_number": 1,
    "map_index": -1,
}


async def test_cold_lease_starts_one_context_and_activates_when_running(h: Harness) -> None:
    lease = await h.lease(holder=AIRFLOW_HOLDER)
    assert lease["state"] == "pending"
    assert lease["holder"] == AIRFLOW_HOLDER
    assert (await h.context(lease["context_id"]))["state"] == "starting"

    await h.settle()

    context = await h.context(lease["context_id"])
    assert context["state"] == "running"
    assert context["refcount"] == 1
    assert (await h.get_lease(lease["id"]))["state"] == "active"
    assert h.backend.starts == 1


async def test_leases_share_a_running_context(h: Harness) -> None:
    first = await h.lease()
    await h.settle()
    second = await h.lease()
    assert second["state"] == "active"
    assert second["context_id"] == first["context_id"]
    assert (await h.context(first["context_id"]))["refcount"] == 2
    assert h.backend.starts == 1


async def test_last_release_idles_then_grace_stops(h: Harness) -> None:
    a = await h.lease()
    b = await h.lease()
    await h.settle()
    cid = a["context_id"]

    await h.client.delete(f"/v1/leases/{a['id']}", headers=h.headers)
    assert (await h.context(cid))["state"] == "running"
    await h.client.delete(f"/v1/leases/{b['id']}", headers=h.headers)
    idle = await h.context(cid)
    assert idle["state"] == "idle"
    assert idle["refcount"] == 0
    assert idle["stops_at"] is not None

    await h.tick(29)  # grace of "small" is 30 s
    assert (await h.context(cid))["state"] == "idle"
    await h.tick(2)
    stopped = await h.context(cid)
    assert stopped["state"] == "stopped"
    assert "grace" in stopped["stop_reason"]
    assert [c for c in h.backend.calls if c[0] == "stop"] == [("stop", "mem-1")]


async def test_idle_context_is_reused_without_a_new_start(h: Harness) -> None:
    a = await h.lease()
    await h.settle()
    await h.client.delete(f"/v1/leases/{a['id']}", headers=h.headers)
    await h.tick(10)
    b = await h.lease(ttl_s=3600)
    assert b["context_id"] == a["context_id"]
    assert b["state"] == "active"
    context = await h.context(a["context_id"])
    assert context["state"] == "running"
    assert context["idle_since"] is None
    await h.tick(100)  # long past the grace: it must not stop, it has a lease
    assert (await h.context(a["context_id"]))["state"] == "running"
    assert h.backend.starts == 1


async def test_a_lease_arriving_after_grace_but_before_the_stop_wins(h: Harness) -> None:
    a = await h.lease()
    await h.settle()
    await h.client.delete(f"/v1/leases/{a['id']}", headers=h.headers)
    h.clock.advance(31)  # grace has passed, but the reconciler has not acted yet
    b = await h.lease()
    assert b["context_id"] == a["context_id"]
    await h.tick()
    assert (await h.context(a["context_id"]))["state"] == "running"
    assert not [c for c in h.backend.calls if c[0] == "stop"]


async def test_the_stop_fence_refuses_a_context_that_has_a_lease_again(h: Harness) -> None:
    """The guarded UPDATE itself: a stop decided on a stale read matches nothing."""
    a = await h.lease()
    await h.settle()
    await h.client.delete(f"/v1/leases/{a['id']}", headers=h.headers)
    await h.lease()  # idle → running again
    stale_cutoff = h.clock.now()
    result, _ = h.service.db.write_sync(
        lambda tx: store.begin_idle_stop(
            tx, a["context_id"], idle_cutoff=stale_cutoff, actor="test", reason="stale"
        )
    )
    assert result is None


async def test_no_lease_is_granted_on_a_stopping_context(h: Harness) -> None:
    a = await h.lease()
    await h.settle()
    h.backend.fail_stop = True  # keep it in stopping
    await h.client.delete(f"/v1/leases/{a['id']}", headers=h.headers)
    await h.tick(31)
    assert (await h.context(a["context_id"]))["state"] == "stopping"
    b = await h.lease()
    assert b["context_id"] != a["context_id"]
    assert b["state"] == "pending"


async def test_full_context_starts_a_second_then_capacity_is_429(h: Harness) -> None:
    ids = [(await h.lease())["context_id"] for _ in range(4)]  # small: 4 per context
    assert len(set(ids)) == 1
    fifth = await h.lease()
    assert fifth["context_id"] != ids[0]
    for _ in range(3):
        await h.lease()
    response = await h.client.post(
        "/v1/leases", json={"profile": "small", "wait_s": 0}, headers=h.headers
    )
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "capacity_exhausted"
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert h.backend.starts == 0  # nothing started yet: no tick ran
    await h.settle()
    assert h.backend.starts == 2


async def test_waiting_request_gets_the_slot_a_release_frees(h: Harness) -> None:
    import asyncio

    leases = [await h.lease() for _ in range(8)]  # fills both contexts of "small"
    waiter = asyncio.create_task(
        h.client.post("/v1/leases", json={"profile": "small", "wait_s": 10}, headers=h.headers)
    )
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await h.client.delete(f"/v1/leases/{leases[3]['id']}", headers=h.headers)
    response = await asyncio.wait_for(waiter, 5)
    assert response.status_code == 201
    assert response.json()["context_id"] == leases[3]["context_id"]


async def test_waiters_are_served_first_in_first_out(h: Harness) -> None:
    import asyncio

    leases = [await h.lease() for _ in range(8)]
    order: list[str] = []

    async def wait_for_lease(name: str) -> None:
        r = await h.client.post(
            "/v1/leases",
            json={"profile": "small", "wait_s": 10, "holder": {"task_id": name}},
            headers=h.headers,
        )
        assert r.status_code == 201, r.text
        order.append(name)

    tasks = []
    for name in ("first", "second", "third"):
        tasks.append(asyncio.create_task(wait_for_lease(name)))
        await asyncio.sleep(0.05)
    for lease in leases[:3]:
        await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
        await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["first", "second", "third"]


async def test_heartbeat_extends_and_silence_expires(h: Harness) -> None:
    lease = await h.lease(ttl_s=10)
    await h.settle()
    h.clock.advance(8)
    beat = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=h.headers)
    assert beat.status_code == 200
    assert beat.json()["expires_at"] > lease["expires_at"]
    await h.tick(8)  # 16 s after the lease, 8 s after the heartbeat
    assert (await h.get_lease(lease["id"]))["state"] == "active"
    await h.tick(3)
    expired = await h.get_lease(lease["id"])
    assert expired["state"] == "expired"
    assert "no heartbeat" in expired["end_reason"]
    assert (await h.context(lease["context_id"]))["state"] == "idle"

    late = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=h.headers)
    assert late.status_code == 410
    assert late.json()["error"]["code"] == "lease_ended"


async def test_heartbeat_after_the_ttl_but_before_a_tick_is_refused(h: Harness) -> None:
    lease = await h.lease(ttl_s=10)
    h.clock.advance(11)
    late = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=h.headers)
    assert late.status_code == 410
    assert (await h.get_lease(lease["id"]))["state"] == "expired"


async def test_release_is_idempotent(h: Harness) -> None:
    lease = await h.lease()
    first = await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    second = await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert second.json()["state"] == "released"
    assert (await h.context(lease["context_id"]))["refcount"] == 0


async def test_idempotency_key_returns_the_first_lease(h: Harness) -> None:
    headers = {**h.headers, "Idempotency-Key": "retry-1"}
    body = {"profile": "small", "holder": AIRFLOW_HOLDER}
    first = await h.client.post("/v1/leases", json=body, headers=headers)
    again = await h.client.post("/v1/leases", json=body, headers=headers)
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert (await h.context(first.json()["context_id"]))["refcount"] == 1

    other = await h.client.post("/v1/leases", json={"profile": "large"}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"


async def test_failed_start_fails_leases_and_next_lease_gets_a_fresh_context(h: Harness) -> None:
    h.backend.fail_start = True
    lease = await h.lease()
    await h.settle()
    failed = await h.get_lease(lease["id"])
    assert failed["state"] == "failed"
    assert "start failed" in failed["end_reason"]
    assert (await h.context(lease["context_id"]))["state"] == "failed"

    h.backend.fail_start = False
    again = await h.lease()
    assert again["context_id"] != lease["context_id"]
    await h.settle()
    assert (await h.get_lease(again["id"]))["state"] == "active"


async def test_a_crashed_context_fails_its_leases(h: Harness) -> None:
    lease = await h.lease()
    await h.settle()
    h.backend.crash("mem-1", "machine lost")
    await h.tick(2)  # past the health-check interval
    assert (await h.context(lease["context_id"]))["state"] == "failed"
    failed = await h.get_lease(lease["id"])
    assert failed["state"] == "failed"
    assert "machine lost" in failed["end_reason"]
    beat = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=h.headers)
    assert beat.status_code == 410
    assert "machine lost" in beat.json()["error"]["message"]


async def test_start_timeout_fails_the_context(make_harness: Any) -> None:
    h: Harness = await make_harness(start_timeout_s=60)
    h.backend.boot_s = 3600
    lease = await h.lease()
    await h.settle()
    assert (await h.context(lease["context_id"]))["state"] == "starting"
    await h.tick(61)
    context = await h.context(lease["context_id"])
    assert context["state"] == "failed"
    assert "start_timeout_s" in context["stop_reason"]
    assert h.backend.contexts["mem-1"].stop_calls == 1  # what was launched is cleaned up


async def test_every_lease_leaving_during_boot_makes_it_idle_then_stop(h: Harness) -> None:
    h.backend.boot_s = 20
    lease = await h.lease()
    await h.settle()
    await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    await h.tick(21)
    await h.tick()
    context = await h.context(lease["context_id"])
    assert context["state"] == "idle"
    await h.tick(31)
    assert (await h.context(lease["context_id"]))["state"] == "stopped"


async def test_admin_force_stop_revokes_leases(h: Harness) -> None:
    lease = await h.lease()
    await h.settle()
    user = h.token("user", "lease")
    denied = await h.client.post(f"/v1/contexts/{lease['context_id']}/stop", headers=user)
    assert denied.status_code == 403

    stopped = await h.client.post(f"/v1/contexts/{lease['context_id']}/stop", headers=h.headers)
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopping"
    revoked = await h.get_lease(lease["id"])
    assert revoked["state"] == "revoked"
    await h.tick()
    assert (await h.context(lease["context_id"]))["state"] == "stopped"
    again = await h.client.post(f"/v1/contexts/{lease['context_id']}/stop", headers=h.headers)
    assert again.status_code == 409


async def test_release_by_holder(h: Harness) -> None:
    mine = [await h.lease(holder={**AIRFLOW_HOLDER, "task_id": t}) for t in ("a", "b")]
    other_run = await h.lease(holder={**AIRFLOW_HOLDER, "run_id": "r2"})
    response = await h.client.delete(
        "/v1/leases", params={"dag_id": "etl", "run_id": "r1"}, headers=h.headers
    )
    assert response.status_code == 200
    assert sorted(x["id"] for x in response.json()["leases"]) == sorted(x["id"] for x in mine)
    assert (await h.get_lease(other_run["id"]))["state"] == "pending"

    one_task = await h.client.delete(
        "/v1/leases",
        params={"dag_id": "etl", "run_id": "r2", "task_id": "t1"},
        headers=h.headers,
    )
    assert [x["id"] for x in one_task.json()["leases"]] == [other_run["id"]]


async def test_release_by_holder_can_name_one_mapped_task_instance(h: Harness) -> None:
    mapped = {i: await h.lease(holder={**AIRFLOW_HOLDER, "map_index": i}) for i in (0, 1)}
    response = await h.client.delete(
        "/v1/leases",
        params={"dag_id": "etl", "run_id": "r1", "task_id": "t1", "map_index": 1},
        headers=h.headers,
    )
    assert [x["id"] for x in response.json()["leases"]] == [mapped[1]["id"]]
    assert (await h.get_lease(mapped[0]["id"]))["state"] == "pending"


async def test_every_transition_is_an_event_with_a_reason(h: Harness) -> None:
    lease = await h.lease(holder=AIRFLOW_HOLDER)
    await h.settle()
    await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    await h.tick(31)
    response = await h.client.get(
        "/v1/events", params={"context_id": lease["context_id"]}, headers=h.headers
    )
    events = list(reversed(response.json()["events"]))
    context_moves = [
        (e["from_state"], e["to_state"]) for e in events if e["kind"] == "context" and e["to_state"]
    ]
    assert context_moves == [
        (None, "starting"),
        ("starting", "running"),
        ("running", "idle"),
        ("idle", "stopping"),
        ("stopping", "stopped"),
    ]
    lease_moves = [(e["from_state"], e["to_state"]) for e in events if e["kind"] == "lease"]
    assert lease_moves == [(None, "pending"), ("pending", "active"), ("active", "released")]
    assert all(e["reason"] and e["actor"] for e in events)
    assert "etl/r1/t1" in events[0]["reason"]


async def test_orphans_are_stopped_and_lost_starts_adopted(h: Harness) -> None:
    labels = {LABEL_MANAGED_BY: "pclease", LABEL_INSTANCE: "pclease"}
    stranger = h.backend.adopt_foreign({**labels, LABEL_CONTEXT_ID: "not-in-the-database"})
    # A context whose start launched but whose checkpoint never reached the database:
    lease = await h.lease()
    launched = h.backend.adopt_foreign({**labels, LABEL_CONTEXT_ID: lease["context_id"]})

    await h.service.reconciler.sweep()
    await h.settle()

    assert h.backend.contexts[stranger].stop_calls == 1
    assert h.backend.contexts[launched].stop_calls == 0
    assert h.backend.starts == 0  # adopted, not started twice
    assert (await h.get_lease(lease["id"]))["state"] == "active"


async def test_failing_stop_is_retried_until_it_succeeds(h: Harness) -> None:
    lease = await h.lease()
    await h.settle()
    h.backend.fail_stop = True
    await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    await h.tick(31)
    await h.tick()
    context = await h.context(lease["context_id"])
    assert context["state"] == "stopping"
    assert "stop failed" in context["status_message"]
    h.backend.fail_stop = False
    await h.tick()
    assert (await h.context(lease["context_id"]))["state"] == "stopped"


async def test_max_lifetime_stops_joining_and_stops_when_idle(make_harness: Any) -> None:
    profiles = {
        "small": {
            "cpus": 1,
            "memory_gb": 1,
            "idle_grace_s": 600,
            "max_lifetime_s": 100,
            "max_contexts": 2,
        }
    }
    h: Harness = await make_harness(profiles=profiles)
    old = await h.lease()
    await h.settle()
    h.clock.advance(101)
    new = await h.lease()
    assert new["context_id"] != old["context_id"]
    await h.client.delete(f"/v1/leases/{old['id']}", headers=h.headers)
    await h.tick()
    context = await h.context(old["context_id"])
    assert context["state"] == "stopped"
    assert "max_lifetime_s" in context["stop_reason"]


async def test_a_stale_snapshot_never_starts_a_context_twice(h: Harness) -> None:
    """A tick can read a context before the previous start saved its checkpoint and act
    after that start finished; it must not launch a second instance."""
    import dataclasses

    lease = await h.lease()
    await h.tick()  # launches the start and saves the handle
    record, _ = h.service.db.write_sync(lambda tx: store.get_context(tx, lease["context_id"]))
    assert record is not None
    assert record.backend_handle is not None
    stale = dataclasses.replace(record, backend_handle=None)
    h.service.reconciler._reconcile(stale)
    await h.service.reconciler.drain()
    assert h.backend.starts == 1
    await h.settle()
    assert (await h.context(lease["context_id"]))["state"] == "running"
