"""Heartbeats answered from memory and written in batches (``heartbeat_flush_s``; see
``pclease_service.leases.heartbeats``). The harness's own flush loop sleeps 5 s here, so
each test flushes by hand where it says so."""

from __future__ import annotations

import asyncio
from typing import Any

from pclease_service import store
from pclease_service.api.schemas import LeaseOut
from pclease_service.states import LeaseState
from tests.harness import Harness

#: The longest flush interval there is: the flush loop stays out of these tests' way.
BATCHED = {"heartbeat_flush_s": 5, "lease_ttl_min_s": 20}


async def beat(h: Harness, lease: dict[str, Any], status: int = 200) -> dict[str, Any]:
    response = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=h.headers)
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def written(h: Harness, lease: dict[str, Any]) -> dict[str, Any]:
    """The lease as its row in the database has it, in the API's JSON."""
    record = h.service.db.read_sync(lambda tx: store.leases.get_lease(tx, lease["id"]))
    assert record is not None
    body: dict[str, Any] = LeaseOut.of(record).model_dump(mode="json")
    return body


async def active_lease(h: Harness) -> dict[str, Any]:
    lease = await h.lease(ttl_s=30)
    await h.settle()
    assert (await h.get_lease(lease["id"]))["state"] == "active"
    return lease


async def test_a_heartbeat_is_answered_at_once_and_written_at_the_next_flush(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(**BATCHED)
    lease = await active_lease(h)
    first = await beat(h, lease)  # read from the database: written before the answer
    assert written(h, lease)["expires_at"] == first["expires_at"]

    h.clock.advance(10)
    second = await beat(h, lease)
    assert second["expires_at"] > first["expires_at"]
    assert second["heartbeat_at"] > first["heartbeat_at"]
    assert written(h, lease)["expires_at"] == first["expires_at"]  # not yet
    # A read answers what the heartbeat acknowledged, not the row.
    assert (await h.get_lease(lease["id"]))["expires_at"] == second["expires_at"]

    await h.service.leases.active.flush()
    row = written(h, lease)
    assert (row["heartbeat_at"], row["expires_at"]) == (
        second["heartbeat_at"],
        second["expires_at"],
    )


async def test_an_end_made_by_another_replica_is_answered_after_the_next_flush(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(**BATCHED)
    lease = await active_lease(h)
    await beat(h, lease)
    # Another replica revokes it: straight in the database, unseen by this one's commits.
    h.service.db.write_sync(
        lambda tx: store.leases.end_lease(
            tx, lease["id"], LeaseState.REVOKED, actor="admin", reason="revoked elsewhere"
        )
    )
    # Until the flush, this replica still trusts what it read; the heartbeat is not
    # written onto the revoked lease.
    assert (await beat(h, lease))["state"] == "active"
    await h.service.leases.active.flush()
    assert written(h, lease)["state"] == "revoked"

    gone = await beat(h, lease, 410)
    assert gone["error"]["code"] == "lease_ended"
    assert "revoked" in gone["error"]["message"]
    assert (await h.get_lease(lease["id"]))["state"] == "revoked"


async def test_an_end_made_by_this_replica_is_answered_at_once(make_harness: Any) -> None:
    h: Harness = await make_harness(**BATCHED)
    lease = await active_lease(h)
    await beat(h, lease)
    released = await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    assert released.status_code == 200
    assert (await beat(h, lease, 410))["error"]["code"] == "lease_ended"
    assert (await h.get_lease(lease["id"]))["state"] == "released"


async def test_a_lease_expires_only_a_grace_after_its_written_deadline(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(**BATCHED)
    assert h.service.settings.lease_expiry_grace_s == 10
    lease = await active_lease(h)
    await h.tick(31)  # past the deadline, within the grace: a heartbeat may be on its way
    assert written(h, lease)["state"] == "active"
    await h.tick(10)
    assert written(h, lease)["state"] == "expired"
    assert (await beat(h, lease, 410))["error"]["code"] == "lease_ended"


async def test_a_heartbeat_past_the_deadline_is_decided_by_the_database(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(**BATCHED)
    lease = await active_lease(h)
    await beat(h, lease)
    h.clock.advance(31)
    assert (await beat(h, lease, 410))["error"]["code"] == "lease_ended"
    assert written(h, lease)["state"] == "expired"


async def test_the_writer_writes_what_it_holds_when_it_stops(make_harness: Any) -> None:
    h: Harness = await make_harness(**BATCHED)
    lease = await active_lease(h)
    await beat(h, lease)
    h.clock.advance(10)
    acknowledged = await beat(h, lease)
    writer = asyncio.create_task(h.service.leases.active.run())
    await asyncio.sleep(0)
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    assert written(h, lease)["expires_at"] == acknowledged["expires_at"]


async def test_only_the_owners_heartbeats_and_reads_are_answered_from_memory(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(**BATCHED)
    owner = h.token("owner", "lease")
    response = await h.client.post("/v1/leases", json={"profile": "small"}, headers=owner)
    assert response.status_code == 201
    lease = response.json()
    await h.settle()
    mine = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=owner)
    assert mine.status_code == 200
    other = h.token("other", "lease")
    theirs = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=other)
    assert theirs.status_code == 404  # another token's lease does not exist for it
    read = await h.client.get(f"/v1/leases/{lease['id']}", headers=other)
    assert read.status_code == 404
    # An admin may heartbeat it: through the database, written before the answer.
    h.clock.advance(5)
    admins = await beat(h, lease)
    assert written(h, lease)["expires_at"] == admins["expires_at"]


async def test_with_a_flush_interval_of_zero_every_heartbeat_is_written_first(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(heartbeat_flush_s=0)
    lease = await active_lease(h)
    for _ in range(3):
        h.clock.advance(5)
        acknowledged = await beat(h, lease)
        assert written(h, lease)["expires_at"] == acknowledged["expires_at"]
    assert len(h.service.leases.active) == 0


async def test_leases_unused_for_longer_than_the_trust_are_dropped_at_a_flush(
    make_harness: Any, monkeypatch: Any
) -> None:
    from pclease_service.leases import heartbeats

    h: Harness = await make_harness(**BATCHED)
    idle, busy = await active_lease(h), await active_lease(h)
    await beat(h, idle)
    await beat(h, busy)
    active = h.service.leases.active
    assert len(active) == 2
    # Another replica ends ``idle``, which nobody here asks about again.
    h.service.db.write_sync(
        lambda tx: store.leases.end_lease(
            tx, idle["id"], LeaseState.RELEASED, actor="admin", reason="released elsewhere"
        )
    )
    later = heartbeats.monotonic() + active.trust_s + 1
    monkeypatch.setattr(heartbeats, "monotonic", lambda: later)
    await beat(h, busy)  # read afresh (its trust ran out too), then used
    await active.flush()
    assert len(active) == 1
    assert (await beat(h, idle, 410))["error"]["code"] == "lease_ended"


async def test_a_burst_on_a_lease_not_known_here_writes_once(
    make_harness: Any, monkeypatch: Any
) -> None:
    h: Harness = await make_harness(**BATCHED)
    lease = await active_lease(h)
    h.service.leases.active.forget([lease["id"]])  # as after a restart
    db = h.service.db
    write, writes = db.write, []

    async def counted(fn: Any) -> Any:
        writes.append(fn)
        return await write(fn)

    monkeypatch.setattr(db, "write", counted)
    answers = await asyncio.gather(*(beat(h, lease) for _ in range(20)))
    assert {answer["state"] for answer in answers} == {"active"}
    assert len(writes) == 1
