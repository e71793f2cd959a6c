"""Three real replicas on one PostgreSQL database behind devkit's balancer (the harness
the replica tests build on)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devkit.airflow_deployment import create_database, drop_database
from devkit.live import wait_for
from devkit.replicas import ReplicaSet

pytestmark = [pytest.mark.live, pytest.mark.postgres]

PROFILES = {"small": {"cpus": 1, "memory_gb": 1, "idle_grace_s": 30}}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ReplicaSet]:
    url = create_database("pclease_rep")
    try:
        with ReplicaSet(
            tmp_path,
            database_url=url,
            profiles=PROFILES,
            settings={"backend": "memory", "reconcile_interval_s": 0.2},
        ) as replicas:
            yield replicas
    finally:
        drop_database(url)


def test_three_replicas_answer_through_the_balancer(fleet: ReplicaSet) -> None:
    token = fleet.token("airflow", "lease")
    auth = {"Authorization": f"Bearer {token}"}
    assert fleet.running() == [0, 1, 2]
    assert len({server.env["PCLEASE_DATA_DIR"] for server in fleet.replicas}) == 3

    # Each request on a new connection: round-robin hands them to the replicas in turn,
    # and all of them read the one database.
    created = httpx.post(
        f"{fleet.url}/v1/leases", json={"profile": "small", "holder": {"dag_id": "d"}}, headers=auth
    )
    assert created.status_code in (200, 201), created.text
    lease_id = created.json()["id"]
    before = dict(fleet.balancer.connections)
    for _ in range(6):
        read = httpx.get(f"{fleet.url}/v1/leases/{lease_id}", headers=auth)
        assert read.status_code == 200, read.text
        assert read.json()["id"] == lease_id
    served = {p: fleet.balancer.connections.get(p, 0) - before.get(p, 0) for p in fleet.ports()}
    assert sorted(served.values()) == [2, 2, 2], served

    # A killed replica's connections go to the others; restarted, it serves again.
    fleet.kill(1)
    assert fleet.running() == [0, 2]
    for _ in range(4):
        read = httpx.get(f"{fleet.url}/v1/leases/{lease_id}", headers=auth)
        assert read.status_code == 200, read.text
    fleet.restart(1)
    assert fleet.running() == [0, 1, 2]
    port = fleet.replicas[1].port
    wait_for(lambda: port in fleet.balancer.ready_ports(), what="r2 ready in the balancer")
    before = fleet.balancer.connections.get(port, 0)
    for _ in range(3):
        read = httpx.get(f"{fleet.url}/v1/leases/{lease_id}", headers=auth)
        assert read.status_code == 200, read.text
    assert fleet.balancer.connections.get(port, 0) - before == 1

    # A graceful stop: the replica exits.
    fleet.terminate(2)
    assert fleet.running() == [0, 1]
    released = httpx.delete(f"{fleet.url}/v1/leases/{lease_id}", headers=auth)
    assert released.status_code == 200, released.text
