"""Rows written before the API refused hostile text (or by another tool) never break a read:
listings, single reads, the dashboard's pages and /metrics all answer, on SQLite and
PostgreSQL, with the text repaired rather than a 500."""

from __future__ import annotations

import re
import uuid
from typing import Any

import httpx
from sqlalchemy import update

from pclease_service import store
from pclease_service.db.schema import leases
from tests.conftest import Harness

# What older versions stored as they were sent: JSON with lone surrogates in keys and
# values (PostgreSQL's json type keeps the \udfff escape as it is).
OLD_HOLDER = {"dag_id": "etl", "run_id": "r1", "task_id": "load", "note": "a\udfffb", "\ud800": 1}
OLD_LABELS = {"team": "x\udfff", "\udc00": "v"}


async def signed_in(h: Harness, token: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=h.client._transport, base_url="http://pclease.test")
    form = await client.get("/ui/login")
    assert form.status_code == 200
    match = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert match is not None
    signed = await client.post("/ui/login", data={"token": token, "csrf": match.group(1)})
    assert signed.status_code == 303, signed.text
    return client


def store_as_an_old_version_did(h: Harness, lease_id: str) -> str:
    """Put hostile text where the edge now refuses it; returns the id of a query with it."""
    sqlite = h.service.db.engine.dialect.name == "sqlite"
    query_id = str(uuid.uuid4())

    def unit(tx: store.Tx) -> None:
        holder: dict[str, Any] = dict(OLD_HOLDER)
        if sqlite:
            holder["cost"] = float("nan")  # Python's json writes NaN; SQLite keeps it
        tx.conn.execute(update(leases).where(leases.c.id == lease_id).values(holder=holder))
        lease = store.get_lease(tx, lease_id)
        assert lease is not None
        store.insert_query(
            tx,
            query_id=query_id,
            lease=lease,
            target="parquet",
            # PostgreSQL never stored a NUL in text (it refused with a 500); SQLite did.
            destination="s3://lake/a\x00b.parquet" if sqlite else "s3://lake/ab.parquet",
            engine="auto",
            labels=OLD_LABELS,
            client_polars_version="2.0.0\x01" if sqlite else "2.0.0",
            plan_bytes=10,
            timeout_s=60,
            actor="token:old",
        )
        if sqlite:
            # Text that is not UTF-8 at all, as another tool could leave it.
            tx.conn.exec_driver_sql(
                "UPDATE leases SET end_reason = CAST(X'6F6BFF21' AS TEXT) WHERE id = ?",
                (lease_id,),
            )

    h.service.db.write_sync(unit)
    return query_id


async def test_stored_hostile_text_never_breaks_a_read(h: Harness) -> None:
    owner = h.token("old-client", "lease")
    lease = await h.lease(headers=owner, holder={"dag_id": "etl", "run_id": "r1"})
    await h.settle()
    query_id = store_as_an_old_version_did(h, lease["id"])

    for headers in (h.headers, owner):
        listed = await h.client.get("/v1/leases", headers=headers)
        assert listed.status_code == 200, listed.text
        [row] = [x for x in listed.json()["leases"] if x["id"] == lease["id"]]
        assert row["holder"]["note"] == "a\ufffdb"
        assert row["holder"]["\ufffd"] == 1
        assert row["holder"].get("cost") is None

    for path in (
        f"/v1/leases/{lease['id']}",
        f"/v1/leases/{lease['id']}/queries",
        f"/v1/queries/{query_id}",
        "/v1/leases?dag_id=etl&run_id=r1",
        "/v1/events",
        f"/v1/events?lease_id={lease['id']}",
        "/v1/contexts",
        f"/v1/contexts/{lease['context_id']}",
    ):
        response = await h.client.get(path, headers=h.headers)
        assert response.status_code == 200, (path, response.text)
    queries = (await h.client.get(f"/v1/leases/{lease['id']}/queries", headers=owner)).json()
    assert queries["queries"][0]["labels"] == {"team": "x\ufffd", "\ufffd": "v"}
    if h.service.db.engine.dialect.name == "sqlite":
        single = (await h.client.get(f"/v1/leases/{lease['id']}", headers=owner)).json()
        assert single["end_reason"] == "ok\ufffd!"

    # Still usable: a heartbeat, a release, and the query cancelled with its lease.
    beat = await h.client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=owner)
    assert beat.status_code == 200, beat.text
    released = await h.client.delete(f"/v1/leases/{lease['id']}", headers=owner)
    assert released.status_code == 200, released.text
    assert released.json()["holder"]["note"] == "a\ufffdb"

    reader = h.token("viewer", "read")["Authorization"].removeprefix("Bearer ")
    admin = h.headers["Authorization"].removeprefix("Bearer ")
    for client in (await signed_in(h, reader), await signed_in(h, admin)):
        for path in (
            "/ui/",
            "/ui/?state=ended",
            f"/ui/leases/{lease['id']}",
            f"/ui/leases/{lease['id']}?done=revoked",
            f"/ui/contexts/{lease['context_id']}",
            "/ui/runs",
            "/ui/runs?dag_id=etl&run_id=r1",
            "/ui/events",
        ):
            page = await client.get(path)
            assert page.status_code == 200, (path, page.text[:2000])
        await client.aclose()
    metrics = await h.client.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    assert 'pclease_leases{profile="small",state="active"}' in metrics.text
