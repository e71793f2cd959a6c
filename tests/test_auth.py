"""Who may do what: tokens, scopes and lease ownership, as a client sees them.

A lease-scope token lives in its own world: another token's lease does not exist for it
(404, the same answer as for an id nobody has). A read-scope token sees everything, so
for it a lease it may not change is a 403. An admin token may do everything.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from pclease_service import store, tokens
from pclease_service.db.schema import events
from tests.conftest import Harness

HOLDER = {"dag_id": "etl", "run_id": "r1", "task_id": "t1"}
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"

PROTECTED = [
    ("GET", "/v1/profiles"),
    ("POST", "/v1/leases"),
    ("GET", "/v1/leases"),
    ("DELETE", "/v1/leases?dag_id=etl&run_id=r1"),
    ("GET", "/v1/leases/{lease}"),
    ("POST", "/v1/leases/{lease}/heartbeat"),
    ("DELETE", "/v1/leases/{lease}"),
    ("GET", "/v1/contexts"),
    ("GET", "/v1/contexts/{context}"),
    ("POST", "/v1/contexts/{context}/stop"),
    ("GET", "/v1/events"),
]


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    message: str = response.json()["error"]["message"]
    return message


async def call(
    h: Harness,
    method: str,
    path: str,
    headers: dict[str, str],
    lease: dict[str, Any],
    **kwargs: Any,
) -> httpx.Response:
    path = path.format(lease=lease["id"], context=lease["context_id"])
    if method == "POST" and path == "/v1/leases":
        kwargs.setdefault("json", {"profile": "small"})
    return await h.client.request(method, path, headers=headers, **kwargs)


def revoked_token(h: Harness) -> dict[str, str]:
    headers = h.token("leaver", "lease")
    h.service.db.write_sync(lambda tx: store.revoke_token(tx, "leaver"))
    return headers


@pytest.mark.parametrize(
    ("credentials", "hint"),
    [
        pytest.param(lambda h: {}, "Authorization: Bearer", id="no-header"),
        pytest.param(
            lambda h: {"Authorization": "Basic dXNlcjpwdw=="}, "Bearer", id="basic-scheme"
        ),
        pytest.param(lambda h: {"Authorization": "Token pcl_abc"}, "Bearer", id="token-scheme"),
        pytest.param(lambda h: {"Authorization": "Bearer"}, "Bearer", id="bearer-no-value"),
        pytest.param(lambda h: {"Authorization": "Bearer    "}, "Bearer", id="bearer-blank"),
        pytest.param(
            lambda h: {"Authorization": "Bearer pcl_" + "x" * 43},
            "unknown or revoked",
            id="unknown-token",
        ),
        pytest.param(revoked_token, "unknown or revoked", id="revoked-token"),
    ],
)
async def test_every_v1_route_needs_a_valid_token(h: Harness, credentials: Any, hint: str) -> None:
    lease = await h.lease()
    headers = credentials(h)
    for method, path in PROTECTED:
        response = await call(h, method, path, headers, lease)
        message = error(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer", (method, path)
        assert hint in message
        assert "pclease token create" in message
    # Nothing was changed by any of it.
    assert (await h.get_lease(lease["id"]))["state"] == "pending"
    assert (await h.context(lease["context_id"]))["refcount"] == 1


async def test_health_needs_no_token(h: Harness) -> None:
    for path in ("/healthz", "/readyz"):
        assert (await h.client.get(path)).status_code == 200


async def test_a_revoked_token_stops_working_and_its_leases_stay(h: Harness) -> None:
    worker = h.token("worker", "lease")
    lease = await h.lease(headers=worker)
    h.service.db.write_sync(lambda tx: store.revoke_token(tx, "worker"))
    error(await h.client.get(f"/v1/leases/{lease['id']}", headers=worker), 401, "unauthorized")
    # The lease is not the token: it lives on (and expires without heartbeats).
    assert (await h.get_lease(lease["id"]))["state"] == "pending"


async def test_another_tokens_lease_does_not_exist_for_a_lease_token(h: Harness) -> None:
    alice, bob = h.token("alice", "lease"), h.token("bob", "lease")
    lease = await h.lease(headers=alice, holder=HOLDER)
    await h.settle()
    before = await h.get_lease(lease["id"])

    for method, path, params in [
        ("GET", "/v1/leases/{id}", {}),
        ("GET", "/v1/leases/{id}", {"wait_s": 1}),
        ("POST", "/v1/leases/{id}/heartbeat", {}),
        ("DELETE", "/v1/leases/{id}", {}),
    ]:
        theirs = await h.client.request(
            method, path.format(id=lease["id"]), params=params, headers=bob
        )
        nobodys = await h.client.request(
            method, path.format(id=UNKNOWN_ID), params=params, headers=bob
        )
        message = error(theirs, 404, "lease_not_found")
        # Indistinguishable from an id nobody has: no hint that the lease exists.
        assert message == error(nobodys, 404, "lease_not_found").replace(UNKNOWN_ID, lease["id"])

    assert await h.get_lease(lease["id"]) == before
    assert (await h.context(lease["context_id"]))["refcount"] == 1
    mine = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=alice)
    assert mine.status_code == 200


async def test_a_lease_token_lists_only_its_own_leases(h: Harness) -> None:
    alice, bob = h.token("alice", "lease"), h.token("bob", "lease")
    alices = {(await h.lease(headers=alice, holder=HOLDER))["id"] for _ in range(2)}
    bobs = await h.lease(headers=bob, holder=HOLDER)

    for params in [
        {},
        {"dag_id": "etl", "run_id": "r1"},
        {"context_id": bobs["context_id"]},
        {"state": ["pending", "active"]},
    ]:
        listed = await h.client.get("/v1/leases", params=params, headers=alice)
        assert listed.status_code == 200
        assert {x["id"] for x in listed.json()["leases"]} == alices, params
    listed = await h.client.get("/v1/leases", headers=bob)
    assert [x["id"] for x in listed.json()["leases"]] == [bobs["id"]]


async def test_a_lease_token_reads_only_its_own_leases_events(h: Harness) -> None:
    alice, bob = h.token("alice", "lease"), h.token("bob", "lease")
    lease = await h.lease(headers=alice)
    others = await h.lease(headers=bob)
    await h.settle()

    for params in [{}, {"context_id": lease["context_id"]}, {"after_id": 0}]:
        message = error(
            await h.client.get("/v1/events", params=params, headers=alice), 403, "forbidden"
        )
        assert "read scope" in message
        assert "lease_id" in message

    own = await h.client.get("/v1/events", params={"lease_id": lease["id"]}, headers=alice)
    assert own.status_code == 200
    moves = [(e["from_state"], e["to_state"]) for e in reversed(own.json()["events"])]
    assert moves == [(None, "pending"), ("pending", "active")]
    assert {e["lease_id"] for e in own.json()["events"]} == {lease["id"]}

    for lease_id in (others["id"], UNKNOWN_ID):
        theirs = await h.client.get("/v1/events", params={"lease_id": lease_id}, headers=alice)
        error(theirs, 404, "lease_not_found")


async def test_a_read_token_sees_everything_and_changes_nothing(h: Harness) -> None:
    alice, reader = h.token("alice", "lease"), h.token("auditor", "read")
    lease = await h.lease(headers=alice, holder=HOLDER)
    await h.settle()
    before = await h.get_lease(lease["id"])

    assert (await h.client.get(f"/v1/leases/{lease['id']}", headers=reader)).json() == before
    listed = await h.client.get("/v1/leases", headers=reader)
    assert [x["id"] for x in listed.json()["leases"]] == [lease["id"]]
    assert (await h.client.get("/v1/events", headers=reader)).json()["events"]
    assert (await h.client.get("/v1/contexts", headers=reader)).json()["contexts"]

    refused = [
        (await h.client.post("/v1/leases", json={"profile": "small"}, headers=reader), "lease"),
        (
            await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=reader),
            "another token",
        ),
        (await h.client.delete(f"/v1/leases/{lease['id']}", headers=reader), "another token"),
        (
            await h.client.delete(
                "/v1/leases", params={"dag_id": "etl", "run_id": "r1"}, headers=reader
            ),
            "lease scope",
        ),
        (await h.client.post(f"/v1/contexts/{lease['context_id']}/stop", headers=reader), "admin"),
    ]
    for response, hint in refused:
        assert hint in error(response, 403, "forbidden"), response.request.url

    assert await h.get_lease(lease["id"]) == before
    context = await h.context(lease["context_id"])
    assert (context["state"], context["refcount"]) == ("running", 1)


async def test_a_lease_token_cannot_force_stop(h: Harness) -> None:
    worker = h.token("worker", "lease")
    lease = await h.lease(headers=worker)
    response = await h.client.post(f"/v1/contexts/{lease['context_id']}/stop", headers=worker)
    assert "admin" in error(response, 403, "forbidden")
    assert (await h.get_lease(lease["id"]))["state"] == "pending"


async def test_an_admin_releases_anyones_lease_and_force_stops(h: Harness) -> None:
    alice, bob = h.token("alice", "lease"), h.token("bob", "lease")
    first = await h.lease(headers=alice)
    second = await h.lease(headers=bob)
    await h.settle()

    beat = await h.client.post(f"/v1/leases/{first['id']}/heartbeat", headers=h.headers)
    assert beat.status_code == 200
    released = await h.client.delete(f"/v1/leases/{first['id']}", headers=h.headers)
    assert released.status_code == 200
    assert released.json()["state"] == "released"
    assert "token:admin-0" in released.json()["end_reason"]

    stopped = await h.client.post(f"/v1/contexts/{second['context_id']}/stop", headers=h.headers)
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopping"
    revoked = await h.client.get(f"/v1/leases/{second['id']}", headers=bob)
    assert revoked.json()["state"] == "revoked"
    error(
        await h.client.post(f"/v1/leases/{second['id']}/heartbeat", headers=bob), 410, "lease_ended"
    )


async def test_bulk_release_by_a_lease_token_releases_only_its_own(h: Harness) -> None:
    alice, bob = h.token("alice", "lease"), h.token("bob", "lease")
    alices = [await h.lease(headers=alice, holder={**HOLDER, "task_id": t}) for t in "ab"]
    bobs = await h.lease(headers=bob, holder=HOLDER)
    params = {"dag_id": "etl", "run_id": "r1"}

    response = await h.client.delete("/v1/leases", params=params, headers=alice)
    assert response.status_code == 200
    assert sorted(x["id"] for x in response.json()["leases"]) == sorted(x["id"] for x in alices)
    assert (await h.get_lease(bobs["id"]))["state"] == "pending"

    again = await h.client.delete("/v1/leases", params=params, headers=alice)
    assert again.json()["leases"] == []  # idempotent, and still not bob's

    by_admin = await h.client.delete("/v1/leases", params=params, headers=h.headers)
    assert [x["id"] for x in by_admin.json()["leases"]] == [bobs["id"]]


async def test_neither_the_token_nor_its_hash_is_ever_shown(h: Harness) -> None:
    worker = h.token("worker", "lease")
    value = worker["Authorization"].removeprefix("Bearer ")
    secrets = (value, tokens.hash_token(value))

    lease = await h.lease(headers=worker, holder=HOLDER)
    await h.settle()
    responses = [
        await h.client.get(f"/v1/leases/{lease['id']}", headers=worker),
        await h.client.get("/v1/leases", headers=worker),
        await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=worker),
        await h.client.get("/v1/events", params={"lease_id": lease["id"]}, headers=worker),
        await h.client.get(f"/v1/leases/{UNKNOWN_ID}", headers=worker),
        await h.client.get("/v1/events", headers=worker),  # 403
        await h.client.post(f"/v1/contexts/{lease['context_id']}/stop", headers=worker),
        await h.client.get("/v1/contexts", headers=h.headers),
        all_events := await h.client.get("/v1/events", headers=h.headers),
        await h.client.delete(f"/v1/leases/{lease['id']}", headers=worker),
        await h.client.get("/v1/leases", headers={"Authorization": f"Bearer {value}x"}),
    ]
    h.service.db.write_sync(lambda tx: store.revoke_token(tx, "worker"))
    responses.append(await h.client.get("/v1/leases", headers=worker))

    for response in responses:
        text = response.text + str(response.headers)
        assert not any(secret in text for secret in secrets), response.request.url
    assert "token:worker" in all_events.text  # events name the token, not its value

    rows = h.service.db.read_sync(lambda tx: tx.conn.execute(select(events)).all())
    assert rows
    assert not any(secret in str(rows) for secret in secrets)
