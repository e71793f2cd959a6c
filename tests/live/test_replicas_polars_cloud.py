"""Replicas of ``pclease serve`` (``backend = "polars_cloud"``) on one PostgreSQL database,
each with its own data directory as on separate machines, against the fake Polars Cloud:
what one replica started, accepted or produced, the others see through the database and
the shared storage."""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import polars as pl
import pytest
from sqlalchemy import select

from devkit.airflow_deployment import create_database, drop_database
from devkit.live import wait_for
from devkit.replicas import ReplicaSet
from pclease_client import PcleaseClient, build_submission
from pclease_service.backends.base import LABEL_CONTEXT_ID
from pclease_service.db.engine import create_db_engine
from pclease_service.db.schema import cloud_starts
from tests.fakepc import FakePolarsCloud
from tests.moto import moto_server

pytestmark = [pytest.mark.live, pytest.mark.postgres]

CLIENT_ID = "pc-client-id"
SECRET = "pcs_" + secrets.token_urlsafe(24)
HOLDER = {"dag_id": "d", "run_id": "r", "task_id": "t"}


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePolarsCloud]:
    server = FakePolarsCloud(
        client_id=CLIENT_ID,
        client_secret=SECRET,
        workspace="pclease-ws",
        data_dir=tmp_path_factory.mktemp("fakepc"),
    ).start()
    yield server
    server.close()


@pytest.fixture
def cloud(fake: FakePolarsCloud) -> Iterator[FakePolarsCloud]:
    fake.reset(start_delay_s=0.3)
    yield fake
    fake.reset()


@pytest.fixture
def database() -> Iterator[str]:
    url = create_database("pclease_rep")
    yield url
    drop_database(url)


def fleet(
    tmp_path: Path,
    cloud: FakePolarsCloud,
    database: str,
    *,
    count: int = 3,
    cloud_options: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    **settings: Any,
) -> ReplicaSet:
    lake = tmp_path / "lake"
    lake.mkdir(exist_ok=True)
    service_env = {k: v for k, v in os.environ.items() if not k.startswith("POLARS_CLOUD_")}
    service_env |= {"POLARS_CLOUD_CLIENT_ID": CLIENT_ID, "POLARS_CLOUD_CLIENT_SECRET": SECRET}
    return ReplicaSet(
        tmp_path / "fleet",
        database_url=database,
        count=count,
        env=service_env | (env or {}),
        settings={
            "backend": "polars_cloud",
            "reconcile_interval_s": 0.2,
            "health_check_interval_s": 0.5,
            "orphan_sweep_interval_s": 1,
            "lease_ttl_min_s": 1,
            "polars_cloud": {
                "api_addr": cloud.url,
                "token_url": cloud.token_url,
                "workspace": "pclease-ws",
                "request_timeout_s": 2,
                **(cloud_options or {}),
            },
            **settings,
        },
        profiles={
            name: {
                "cpus": cpus,
                "memory_gb": 4,
                "idle_grace_s": 60,
                "data_roots": [str(lake)],
                "polars_cloud": {"idle_timeout_mins": 20},
            }
            for name, cpus in (("small", 2), ("large", 4))
        },
    )


def of_context(cloud: FakePolarsCloud, context_id: str) -> list[dict[str, Any]]:
    return [c for c in cloud.computes() if c["labels"].get(LABEL_CONTEXT_ID) == context_id]


def lease_state(url: str, token: str, lease_id: str) -> str:
    response = httpx.get(
        f"{url}/v1/leases/{lease_id}", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return str(response.json()["state"])


def test_stop_unknown_computes_on_two_replicas_stops_nothing_the_other_started(
    tmp_path: Path, cloud: FakePolarsCloud, database: str
) -> None:
    replicas = fleet(
        tmp_path, cloud, database, count=2, cloud_options={"stop_unknown_computes": True}
    )
    with replicas.start(only=[0]):
        token = replicas.token("etl", "admin")
        first, second = replicas.replicas
        with PcleaseClient(first.url, token, retries=1) as client:
            small = client.create_lease("small", holder=HOLDER, ttl_s=60)
            wait_for(lambda: lease_state(first.url, token, small.id) == "active", 30)
        replicas.restart(1)  # r2 joins, sweeps every second, with its own data directory
        with PcleaseClient(second.url, token, retries=1) as client:
            large = client.create_lease("large", holder=HOLDER, ttl_s=60)
        wait_for(lambda: lease_state(second.url, token, large.id) == "active", 30)
        # A compute of the same service account that nobody recorded: stopped by a sweep.
        user = cloud.auth.subject_for(CLIENT_ID)
        stray = cloud.start_compute(cloud.workspace_id, user, {"cluster_size": 1})
        wait_for(lambda: all(c["id"] != stray.id for c in cloud.running()), 30, "the stray to stop")
        # Both replicas have swept many times by now; each kept the other's compute.
        for lease in (small, large):
            assert lease_state(first.url, token, lease.id) == "active"
            [compute] = of_context(cloud, lease.context_id)
            assert compute["status"] in ("Running", "Idle"), compute
        stopped = {c.path for c in cloud.calls if c.method == "POST" and c.path.endswith("/stop")}
        assert any(stray.id in path for path in stopped)
        for lease in (small, large):
            [compute] = of_context(cloud, lease.context_id)
            assert not any(compute["id"] in path for path in stopped), stopped


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


def test_a_query_submitted_through_one_replica_is_read_through_another(
    tmp_path: Path, cloud: FakePolarsCloud, database: str, moto_url: str
) -> None:
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    bucket = f"pclease-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket=bucket)
    replicas = fleet(
        tmp_path,
        cloud,
        database,
        count=2,
        env=aws,
        storage={"kind": "s3", "url": f"s3://{bucket}/spool/", "endpoint_url": moto_url},
    )
    with replicas.start(only=[0]):
        token = replicas.token("etl", "admin")
        a, b = replicas.replicas
        frame = pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
        with PcleaseClient(a.url, token, retries=1) as through_a:
            lease = through_a.create_lease("small", holder=HOLDER, ttl_s=60)
            wait_for(lambda: lease_state(a.url, token, lease.id) == "active", 30)
            replicas.restart(1)
            with PcleaseClient(b.url, token, retries=1) as through_b:
                for submit, read in ((through_a, through_b), (through_b, through_a)):
                    lf = frame.lazy().filter(pl.col("a") > 1).with_columns(c=pl.col("a") * 10)
                    query = submit.submit(lease.id, build_submission(lf, "collect", None))
                    done = read.wait_query(query.id, timeout_s=60)
                    assert done.state.value == "succeeded", done
                    assert read.result_frame(query.id).equals(lf.collect())
        # Nothing of the queries is on either replica's disk: plans and results are in S3.
        for server in (a, b):
            data_dir = Path(server.env["PCLEASE_DATA_DIR"])
            leftovers = [p for p in data_dir.rglob("*") if p.suffix in (".plan", ".arrow")]
            assert leftovers == []
        stored = boto3.client(
            "s3",
            endpoint_url=moto_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).list_objects_v2(Bucket=bucket, Prefix="spool/results/")
        assert len(stored.get("Contents", [])) == 2


@pytest.mark.parametrize("use_manifests", [True, False], ids=["manifests", "ledger"])
def test_sigkill_of_the_replica_starting_a_context_leaves_one_compute(
    tmp_path: Path, cloud: FakePolarsCloud, database: str, use_manifests: bool
) -> None:
    # All three run; the claims make one of them the context's only actor.
    replicas = fleet(
        tmp_path,
        cloud,
        database,
        cloud_options={"use_manifests": use_manifests},
        replica_ttl_s=3,
        replica_heartbeat_s=0.5,
    )
    with replicas:
        token = replicas.token("etl", "admin")
        cloud.hang_start_answers_s = 8  # the compute exists, the answer has not come
        with PcleaseClient(replicas.url, token, retries=1) as client:
            leases = [client.create_lease("small", holder=HOLDER, ttl_s=60) for _ in range(2)]
        [context_id] = {lease.context_id for lease in leases}
        wait_for(lambda: of_context(cloud, context_id), what="the start request to arrive")
        [starter] = wait_for(
            lambda: [
                i
                for i, server in enumerate(replicas.replicas)
                if f"starting context {context_id}" in server.log()
            ],
            what="the replica that starts the context",
        )
        replicas.kill(starter)  # mid-start: the handle was never saved
        cloud.hang_start_answers_s = 0.0
        other = replicas.replicas[(starter + 1) % 3].url
        for lease in leases:
            wait_for(
                lambda lease_id=lease.id: lease_state(other, token, lease_id) == "active",
                timeout_s=60,
                what="the pending lease to become active through another replica",
            )
        [compute] = of_context(cloud, context_id)
        assert compute["status"] in ("Starting", "Running", "Idle")
        if use_manifests:
            # The other replica's start by name reconnected to the cluster the dead one made.
            [manifest] = [
                m
                for m in cloud.manifests.snapshot()
                if m["env_vars"].get("PCLEASE_CONTEXT_ID") == context_id
            ]
            assert manifest["live_cluster_id"] == compute["id"]
            return
        # The ledger says who made the start (the replica that died before it heard the
        # answer) and which compute it made (recorded by another replica).
        engine = create_db_engine(database, pool_size=1)
        try:
            with engine.connect() as conn:
                row = conn.execute(
                    select(cloud_starts).where(cloud_starts.c.context_id == context_id)
                ).one()
        finally:
            engine.dispose()
        assert (row.replica, row.compute_id) == (f"r{starter + 1}", compute["id"])


def test_a_cold_burst_spread_over_the_replicas_starts_exactly_one_compute(
    tmp_path: Path, cloud: FakePolarsCloud, database: str
) -> None:
    before = {c["id"] for c in cloud.computes()}
    replicas = fleet(tmp_path, cloud, database)
    with replicas:
        token = replicas.token("etl", "lease")
        auth = {"Authorization": f"Bearer {token}"}

        def lease(i: int) -> httpx.Response:
            # A new connection each: the balancer hands them to the replicas in turn.
            return httpx.post(
                f"{replicas.url}/v1/leases",
                json={"profile": "small", "holder": {**HOLDER, "task_id": str(i)}},
                headers={**auth, "Idempotency-Key": f"burst-{i}"},
                timeout=60,
            )

        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lease, range(24)))
        assert [r.status_code for r in answers] == [201] * 24, [r.text for r in answers]
        [context_id] = {r.json()["context_id"] for r in answers}
        served = [replicas.balancer.connections.get(port, 0) for port in replicas.ports()]
        assert all(n >= 6 for n in served), served
        for lease_id in [r.json()["id"] for r in answers]:
            wait_for(
                lambda lease_id=lease_id: lease_state(replicas.url, token, lease_id) == "active",
                timeout_s=60,
                what="every lease of the burst to become active",
            )
        started = [c for c in cloud.computes() if c["id"] not in before]
        assert [c["id"] for c in started] == [c["id"] for c in of_context(cloud, context_id)]
        assert len(started) == 1, started
