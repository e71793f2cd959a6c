"""The polars_cloud backend object against a fake Polars Cloud, through the real client.

The client reads ``POLARS_CLOUD_API_ADDR`` once per process, so every test here shares one
fake (on the port a previous fake in this process used, if any); each test resets its knobs
and stops whatever the previous test left running.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import polars as pl
import pytest

from pclease_client.plans import build_submission
from service.backends.base import (
    LABEL_CONTEXT_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_PROFILE,
    BackendError,
    ContextSpec,
    Handle,
    Phase,
    QuerySpec,
    QueryTarget,
)
from service.backends.polars_cloud import PolarsCloudBackend
from service.config import Settings
from service.credentials import TokenProvider, create_source
from tests.fakepc import FakePolarsCloud

CLIENT_ID = "pc-client-id"
SECRET = "pcs_" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePolarsCloud]:
    previous = os.environ.get("POLARS_CLOUD_API_ADDR")
    port = urlparse(previous).port or 0 if previous else 0
    server = FakePolarsCloud(
        client_id=CLIENT_ID,
        client_secret=SECRET,
        workspace="pclease-ws",
        data_dir=tmp_path_factory.mktemp("fakepc"),
        port=port,
    ).start()
    yield server
    server.close()


@pytest.fixture
def cloud(fake: FakePolarsCloud) -> Iterator[FakePolarsCloud]:
    fake.reset()
    yield fake
    fake.reset()


_made: list[PolarsCloudBackend] = []


@pytest.fixture(autouse=True)
async def _close_backends() -> Any:
    yield
    while _made:
        await _made.pop().close()


def make_backend(
    fake: FakePolarsCloud, tmp_path: Path, *, secret: str = SECRET, **pc: Any
) -> PolarsCloudBackend:
    id_file, secret_file = tmp_path / "client_id", tmp_path / "client_secret"
    id_file.write_text(CLIENT_ID)
    secret_file.write_text(secret)
    settings = Settings(
        data_dir=tmp_path / "svc",
        backend="polars_cloud",
        polars_cloud={
            "api_addr": fake.url,
            "token_url": fake.token_url,
            "workspace": "pclease-ws",
            "request_timeout_s": 10,
            "credentials": {
                "source": "file",
                "client_id_file": str(id_file),
                "client_secret_file": str(secret_file),
            },
            **pc,
        },
        profiles={"small": {"cpus": 2, "memory_gb": 4, "data_roots": [str(tmp_path)]}},
    )
    options = settings.polars_cloud
    provider = TokenProvider(
        create_source(options.credentials),
        options.token_url,
        refresh_margin_s=options.token_refresh_margin_s,
        retry_delays_s=(0.1,),
    )
    backend = PolarsCloudBackend(settings, provider)
    _made.append(backend)
    return backend


def spec(context_id: str = "ctx-1", **options: Any) -> ContextSpec:
    return ContextSpec(
        context_id=context_id,
        profile="small",
        cpus=2,
        memory_gb=3.5,
        labels={
            LABEL_MANAGED_BY: "pclease",
            LABEL_INSTANCE: "pclease",
            LABEL_CONTEXT_ID: context_id,
            LABEL_PROFILE: "small",
        },
        options={"requirements": [], "env": {}, "idle_timeout_mins": 30, **options},
    )


async def running(backend: PolarsCloudBackend, s: ContextSpec) -> Handle:
    handle = await backend.start(s)
    for _ in range(100):
        if (await backend.status(handle)).phase is Phase.RUNNING:
            return handle
        await asyncio.sleep(0.05)
    raise AssertionError("the context did not start")


def query(
    tmp_path: Path, lf: pl.LazyFrame, target: str, destination: str | None = None, **kw: Any
) -> QuerySpec:
    sub = build_submission(lf, target, destination)  # type: ignore[arg-type]
    return QuerySpec(
        query_id=secrets.token_hex(4),
        plan=sub.plan,
        target=QueryTarget(target),
        result_path=str(tmp_path / "result.arrow") if target == "collect" else None,
        data_roots=(str(tmp_path),),
        **kw,
    )


async def test_start_status_list_stop(cloud: FakePolarsCloud, tmp_path: Path) -> None:
    backend = make_backend(cloud, tmp_path)
    s = spec(requirements=["pyarrow==16"], env={"A": "1"}, idle_timeout_mins=45)
    handle = await running(backend, s)
    assert set(handle) == {"workspace_id", "compute_id"}
    [compute] = [c for c in cloud.computes() if c["id"] == handle["compute_id"]]
    assert compute["labels"][LABEL_CONTEXT_ID] == "ctx-1"
    assert compute["labels"][LABEL_MANAGED_BY] == "pclease"
    assert compute["mode"] == "Proxy"
    assert (compute["cpus"], compute["ram_gb"]) == (2, 4)
    assert compute["idle_timeout_mins"] == 45
    assert compute["env_vars"] == {"A": "1"}
    assert "pyarrow==16" in compute["requirements_txt"]

    [observed] = await backend.list()
    assert observed.context_id == "ctx-1"
    assert dict(observed.handle) == dict(handle)
    assert observed.phase is Phase.RUNNING

    # A new backend on the same data dir (a restarted service) still knows it.
    again = make_backend(cloud, tmp_path)
    assert [o.context_id for o in await again.list()] == ["ctx-1"]

    await backend.stop(handle)
    await backend.stop(handle)  # idempotent
    assert (await backend.status(handle)).phase in (Phase.STOPPING, Phase.STOPPED)
    assert cloud.running() == []
    assert await backend.list() == []


async def test_unknown_and_half_started_computes_are_listed(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path, stop_unknown_computes=True)
    await running(backend, spec("known"))
    user = cloud.auth.subject_for(CLIENT_ID)
    # A compute the service account started that no ledger entry knows: an orphan.
    orphan = cloud.start_compute(cloud.workspace_id, user, {"cluster_size": 1})
    # A compute of another user: not ours, never listed.
    cloud.start_compute(cloud.workspace_id, str(uuid.uuid4()), {"cluster_size": 1})
    seen = {o.handle["compute_id"]: o.context_id for o in await backend.list()}
    assert seen[orphan.id] is None
    assert len(seen) == 2
    # By default a compute nobody recorded is not ours to stop: it may be someone else's.
    cautious = make_backend(cloud, tmp_path)
    assert orphan.id not in {o.handle["compute_id"] for o in await cautious.list()}
    await backend.stop({"workspace_id": cloud.workspace_id, "compute_id": orphan.id})


async def test_query_sink_collect_and_errors(cloud: FakePolarsCloud, tmp_path: Path) -> None:
    backend = make_backend(cloud, tmp_path)
    handle = await running(backend, spec())
    lf = pl.LazyFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})

    out = tmp_path / "out.parquet"
    outcome = await backend.execute(handle, query(tmp_path, lf, "parquet", str(out)))
    assert outcome.ok, outcome
    assert pl.read_parquet(out).equals(lf.collect())

    q = query(tmp_path, lf.filter(pl.col("a") > 1), "collect")
    outcome = await backend.execute(handle, q)
    assert outcome.ok, outcome
    assert outcome.rows == 2
    assert q.result_path is not None
    assert pl.read_ipc(q.result_path).equals(lf.filter(pl.col("a") > 1).collect())

    outcome = await backend.execute(handle, query(tmp_path, lf.select("nope"), "collect"))
    assert not outcome.ok
    assert outcome.error_type == "ColumnNotFoundError"
    assert "nope" in (outcome.error_message or "")

    cloud.query_error = "ComputeError: boom"
    outcome = await backend.execute(handle, query(tmp_path, lf, "collect"))
    assert (outcome.error_type, outcome.error_message) == ("ComputeError", "boom")
    cloud.query_error = None

    # Checked again before forwarding: a write outside the data roots.
    outcome = await backend.execute(handle, query(tmp_path, lf, "parquet", "/elsewhere/x.pq"))
    assert not outcome.ok and outcome.error_type == "PlanRefused"


async def test_cancelling_the_task_cancels_the_query(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    handle = await running(backend, spec())
    cloud.query_delay_s = 30
    before = len(cloud.queries())
    task = asyncio.create_task(
        backend.execute(handle, query(tmp_path, pl.LazyFrame({"a": [1]}), "collect"))
    )
    for _ in range(300):
        if len(cloud.queries()) > before:
            break
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(300):
        if [q["status"] for q in cloud.queries()][-1:] == ["Canceled"]:
            break
        await asyncio.sleep(0.05)
    assert cloud.queries()[-1]["status"] == "Canceled", cloud.queries()[-1]
    # The context is still usable.
    cloud.query_delay_s = 0
    outcome = await backend.execute(handle, query(tmp_path, pl.LazyFrame({"a": [1]}), "collect"))
    assert outcome.ok, outcome


async def test_a_failed_start_is_retried_without_a_second_context(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    cloud.fail_starts = 1
    await running(backend, spec())
    assert len(cloud.running()) == 1

    cloud.fail_starts = 10
    with pytest.raises(BackendError, match="refused to start"):
        await backend.start(spec("ctx-2"))
    assert len(cloud.running()) == 1
    cloud.fail_starts = 0


async def test_context_that_ends_failed(cloud: FakePolarsCloud, tmp_path: Path) -> None:
    backend = make_backend(cloud, tmp_path)
    cloud.start_ends_failed = True
    handle = await backend.start(spec())
    observation = await backend.status(handle)
    assert observation.phase is Phase.FAILED
    assert "failed to start" in (observation.message or "")
    cloud.start_ends_failed = False

    handle = await running(backend, spec("ctx-2"))
    cloud.fail_compute(str(handle["compute_id"]), "the machine died")
    observation = await backend.status(handle)
    assert observation.phase is Phase.FAILED
    assert "the machine died" in (observation.message or "")


async def test_5xx_bursts_and_failing_stops_are_retried(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    handle = await running(backend, spec())
    cloud.error_burst(2, status=503)
    assert (await backend.status(handle)).phase is Phase.RUNNING
    cloud.error_burst(2, status=500)
    assert len(await backend.list()) == 1

    cloud.fail_stops = 10
    with pytest.raises(BackendError, match="stop"):
        await backend.stop(handle)
    assert len(cloud.running()) == 1
    cloud.fail_stops = 1
    await backend.stop(handle)
    assert cloud.running() == []


async def test_revoked_token_is_replaced_once(cloud: FakePolarsCloud, tmp_path: Path) -> None:
    backend = make_backend(cloud, tmp_path)
    handle = await running(backend, spec())
    issued = cloud.tokens_issued
    cloud.revoke_tokens()
    assert (await backend.status(handle)).phase is Phase.RUNNING
    assert cloud.tokens_issued == issued + 1
    refused = [c for c in cloud.calls if c.status == 401]
    assert refused, "the revoked token was never refused"


async def test_bad_credentials_name_the_source(cloud: FakePolarsCloud, tmp_path: Path) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    backend = make_backend(cloud, tmp_path, secret=wrong)
    with pytest.raises(BackendError) as caught:
        await backend.list()
    message = str(caught.value)
    assert "client_secret" in message or str(tmp_path) in message
    assert wrong not in message and SECRET not in message
    status = backend.credential_status()
    assert not status.ok
    assert wrong not in repr(status)
    with pytest.raises(BackendError):
        await backend.start(spec())
    assert cloud.running() == []
