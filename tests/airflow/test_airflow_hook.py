"""PcleaseHook against the real service app (a live ``pclease serve``, local backend):
no hand-written HTTP mocks."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import polars as pl
import pytest
from polars.exceptions import ColumnNotFoundError

from devkit.live import LiveServer, run_cli, write_config

# Airflow reads its home when first imported; keep it out of the user's.
os.environ.setdefault("AIRFLOW_HOME", str(Path(__file__).parent / ".airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from airflow.sdk import Connection

from airflow_plugin.hooks import (
    PcleaseHook,
    PcleaseLeaseLostError,
    settings_from_connection,
    task_holder,
)

pytestmark = pytest.mark.live

HOLDER = {"dag_id": "etl", "run_id": "r1", "task_id": "load", "try_number": 2, "map_index": 3}


class Service:
    def __init__(self, server: LiveServer, token: str, admin: str, lake: Path) -> None:
        self.server, self.token, self.admin, self.lake = server, token, admin, lake
        self.hooks: list[PcleaseHook] = []

    def hook(self, token: str | None = None, **extra: Any) -> PcleaseHook:
        host, port = self.server.url.removeprefix("http://").split(":")
        conn = Connection(
            conn_id="pclease_test",
            conn_type="pclease",
            host=host,
            port=int(port),
            password=token if token is not None else self.token,
            extra=extra or None,
        )
        hook = PcleaseHook("pclease_test", connection=conn)
        self.hooks.append(hook)
        return hook

    def close_hooks(self) -> None:
        while self.hooks:
            self.hooks.pop().close()

    def queries(self, lease_id: str) -> list[dict[str, Any]]:
        response = httpx.get(
            f"{self.server.url}/v1/leases/{lease_id}/queries",
            headers={"Authorization": f"Bearer {self.admin}"},
        )
        return list(response.json()["queries"])

    def lease(self, lease_id: str) -> dict[str, Any]:
        response = httpx.get(
            f"{self.server.url}/v1/leases/{lease_id}",
            headers={"Authorization": f"Bearer {self.admin}"},
        )
        return dict(response.json())


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("hook")
    lake = tmp / "lake"
    lake.mkdir()
    config = write_config(
        tmp / "pclease.toml",
        {
            "data_dir": str(tmp / "svc"),
            "database_url": f"sqlite:///{tmp / 'svc.db'}",
            "backend": "local",
            "reconcile_interval_s": 0.2,
            "lease_ttl_s": 15,
        },
        {"small": {"cpus": 1, "memory_gb": 1, "idle_grace_s": 30, "data_roots": [str(lake)]}},
    )
    run_cli(config, "db", "upgrade")
    token = run_cli(config, "token", "create", "airflow", "--scope", "lease").strip()
    admin = run_cli(config, "token", "create", "ops", "--scope", "admin").strip()
    server = LiveServer(config, tmp / "server.log").start()
    try:
        yield Service(server, token, admin, lake)
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _close_hooks(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "service" in request.fixturenames:
        request.getfixturevalue("service").close_hooks()


def conn(**fields: Any) -> Any:
    base = {"conn_id": "c", "host": "pclease.internal", "port": None, "schema": None}
    return SimpleNamespace(**{**base, **fields, "extra_dejson": fields.get("extra", {})})


def test_connection_settings() -> None:
    assert settings_from_connection(conn(port=8040)).base_url == "http://pclease.internal:8040"
    tls = settings_from_connection(conn(host="https://pclease.internal/", extra={"timeout_s": 5}))
    assert (tls.base_url, tls.timeout_s, tls.verify) == ("https://pclease.internal", 5.0, True)
    assert settings_from_connection(conn(schema="https")).base_url == "https://pclease.internal"
    assert settings_from_connection(conn(extra={"verify_tls": "false"})).verify is False
    assert settings_from_connection(conn(extra={"ca_bundle": "/ca.pem"})).verify == "/ca.pem"
    dash = settings_from_connection(conn(extra={"dashboard_url": "https://dash.example/"}))
    assert dash.dashboard_url == "https://dash.example"
    for bad, message in (
        (conn(host=""), "has no host: set it"),
        (conn(schema="ftp"), "scheme must be http or https"),
        (conn(extra={"verify_tls": "maybe"}), "verify_tls must be true or false"),
        (conn(extra={"timeout_s": -1}), "timeout_s must be positive"),
    ):
        with pytest.raises(ValueError, match=message):
            settings_from_connection(bad)


def test_test_connection(service: Service) -> None:
    ok, message = service.hook().test_connection()
    assert ok, message
    assert "profiles: small" in message
    bogus = "not-a-real-token-" + "x" * 20
    ok, message = service.hook(token=bogus).test_connection()
    assert not ok
    assert "401" in message
    assert bogus not in message
    ok, message = service.hook(token="").test_connection()
    assert not ok
    assert "has no password: put a pclease token there" in message


def test_lease_runs_queries_and_releases(service: Service) -> None:
    hook = service.hook()
    out = service.lake / "squares.parquet"
    with hook.lease("small", context={"ti": SimpleNamespace(**HOLDER)}) as lease:
        held = service.lease(lease.id)
        assert held["state"] == "active"
        assert held["holder"] == HOLDER
        assert lease.url == f"{service.server.url}/ui/leases/{lease.id}"
        lf = pl.LazyFrame({"n": [1, 2, 3]}).with_columns(sq=pl.col("n") ** 2)
        assert lease.remote(lf).sink_parquet(str(out)).rows == 3
        assert lease.remote(lf).collect()["sq"].to_list() == [1, 4, 9]
        queries = service.queries(lease.id)
        assert [q["labels"] for q in queries] == [
            {f"airflow.{key}": str(value) for key, value in HOLDER.items()}
        ] * 2
        with pytest.raises(ColumnNotFoundError, match="missing"):
            lease.remote(lf.select("missing")).collect()
    assert pl.read_parquet(out)["sq"].to_list() == [1, 4, 9]
    assert service.lease(lease.id)["state"] == "released"


def test_lease_is_released_when_the_body_raises(service: Service) -> None:
    with pytest.raises(RuntimeError, match="boom"), service.hook().lease("small") as lease:
        raise RuntimeError("boom")
    assert service.lease(lease.id)["state"] == "released"


def test_heartbeats_keep_a_lease_past_its_ttl(service: Service) -> None:
    hook = service.hook()
    with hook.lease("small", ttl_s=5) as lease:
        threading.Event().wait(8)  # longer than the TTL: only heartbeats keep it
        assert service.lease(lease.id)["state"] == "active"


def test_a_lease_lost_underneath_fails_clearly_and_stops_work(service: Service) -> None:
    hook = service.hook()
    leases = []

    def work_after_a_revoke() -> None:
        with hook.lease("small") as lease:
            leases.append(lease)
            httpx.post(
                f"{service.server.url}/v1/contexts/{lease.context_id}/stop",
                headers={"Authorization": f"Bearer {service.admin}"},
            ).raise_for_status()
            lease.remote(pl.LazyFrame({"a": [1]})).collect()

    with pytest.raises(PcleaseLeaseLostError) as caught:
        work_after_a_revoke()
    (lease,) = leases
    message = str(caught.value)
    assert f"pclease lease {lease.id} ended underneath this task (revoked" in message
    assert "no more work was submitted" in message


def test_an_expired_lease_fails_the_task_clearly(service: Service) -> None:
    hook = service.hook()
    leases = []

    def stalls_past_the_ttl() -> None:
        with hook.lease("small", ttl_s=5) as lease:
            leases.append(lease)
            lease._lease._stop.set()  # a stalled worker: no more heartbeats
            threading.Event().wait(8)
            lease.remote(pl.LazyFrame({"a": [1]})).collect()

    with pytest.raises(PcleaseLeaseLostError, match=r"ended underneath this task \(expired"):
        stalls_past_the_ttl()
    assert service.lease(leases[0].id)["state"] == "expired"


def test_release_holder_and_task_holder(service: Service) -> None:
    client = service.hook().get_conn()
    mine = [client.create_lease("small", holder={**HOLDER, "map_index": i}) for i in (0, 1)]
    released = service.hook().release_holder("etl", "r1", "load", map_index=1)
    assert released == [mine[1].id]
    assert service.hook().release_holder("etl", "r1") == [mine[0].id]
    assert task_holder({"ti": SimpleNamespace(**HOLDER, state="running")}) == HOLDER
    assert task_holder({}) == {}


def test_operators_refuse_bad_arguments_clearly() -> None:
    from airflow.sdk import DAG

    from airflow_plugin.decorators import pclease_task
    from airflow_plugin.operators import PcleaseOperator

    def frame() -> pl.LazyFrame:
        return pl.LazyFrame({"a": [1]})

    with DAG("bad_arguments", schedule=None):
        for kwargs, message in (
            ({"sink": "xlsx", "target": "/x"}, "sink must be one of parquet, csv, ipc, ndjson"),
            ({"sink": "parquet"}, "sink='parquet' needs a target"),
            ({"build": "not a function", "target": "/x"}, "build must be a callable"),
        ):
            with pytest.raises((ValueError, TypeError), match=message):
                PcleaseOperator(task_id="t", profile="small", **{"build": frame, **kwargs})

        def no_lease(src: str) -> None: ...

        def lease_second(src: str, lease: Any) -> None: ...

        for function in (no_lease, lease_second):
            with pytest.raises(TypeError, match="must take 'lease' as its first parameter"):
                pclease_task(profile="small")(function)("input")
