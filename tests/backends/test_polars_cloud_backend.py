"""The polars_cloud backend object against a fake Polars Cloud, through the real client.

The client reads ``POLARS_CLOUD_API_ADDR`` once per process, so every test here shares one
fake (on the port a previous fake in this process used, if any); each test resets its knobs
and stops whatever the previous test left running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import polars as pl
import pytest

from pclease_client.plans import build_submission
from pclease_service.backends.base import (
    LABEL_CONTEXT_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED_BY,
    LABEL_PROFILE,
    Capabilities,
    ContextSpec,
    Handle,
    Observed,
    Phase,
    QuerySpec,
)
from pclease_service.backends.memory import MemoryBackend
from pclease_service.backends.polars_cloud import PolarsCloudBackend
from pclease_service.backends.polars_cloud.host import ClientHost, client_environment
from pclease_service.clock import SystemClock
from pclease_service.config import ConfigError, DistributedSettings, Settings, load_settings
from pclease_service.credentials import ServiceAccount, TokenProvider, create_source
from pclease_service.db.engine import create_db_engine
from pclease_service.db.migrate import upgrade
from pclease_service.db.session import Database
from pclease_service.errors import BackendError
from pclease_service.plans.targets import QueryTarget
from pclease_service.reconciler.starts import DatabaseStartLedger
from tests.fakepc import FakePolarsCloud
from tests.harness import Harness

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
_databases: list[Database] = []


@pytest.fixture(autouse=True)
async def _close_backends() -> Any:
    yield
    while _made:
        await _made.pop().close()
    while _databases:
        _databases.pop().engine.dispose()


def start_ledger(tmp_path: Path) -> DatabaseStartLedger:
    """The service's start ledger on a SQLite database of ``tmp_path`` (the same one for
    every backend of a test: a restarted service, or a second replica)."""
    url = f"sqlite:///{tmp_path / 'pclease.db'}"
    upgrade(url)
    db = Database(create_db_engine(url), SystemClock())
    _databases.append(db)
    return DatabaseStartLedger(db, SystemClock())


def make_backend(
    fake: FakePolarsCloud,
    tmp_path: Path,
    *,
    secret: str = SECRET,
    profiles: dict[str, Any] | None = None,
    host: ClientHost | None = None,
    **pc: Any,
) -> PolarsCloudBackend:
    tmp_path.mkdir(exist_ok=True)
    id_file, secret_file = tmp_path / "client_id", tmp_path / "client_secret"
    id_file.write_text(CLIENT_ID)
    secret_file.write_text(secret)
    small = {"cpus": 2, "memory_gb": 4, "data_roots": [str(tmp_path)]}
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
        profiles={"small": small, **(profiles or {})},
    )
    options = settings.polars_cloud
    provider = TokenProvider(
        create_source(options.credentials),
        options.token_url,
        refresh_margin_s=options.token_refresh_margin_s,
        retry_delays_s=(0.1,),
    )
    backend = PolarsCloudBackend(settings, provider, ledger=start_ledger(tmp_path), host=host)
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
    assert set(handle) == {"workspace_id", "compute_id", "manifest"}
    assert handle["manifest"] == "pclease-small-0"
    [compute] = [c for c in cloud.computes() if c["id"] == handle["compute_id"]]
    assert compute["name"] == "pclease-small-0"
    assert compute["labels"][LABEL_CONTEXT_ID] == "ctx-1"
    assert compute["labels"][LABEL_MANAGED_BY] == "pclease"
    assert compute["mode"] == "Proxy"
    assert (compute["cpus"], compute["ram_gb"]) == (2, 4)
    assert compute["idle_timeout_mins"] == 45
    # The manifest's environment names the context it was registered for.
    assert compute["env_vars"] == {
        "A": "1",
        "PCLEASE_CONTEXT_ID": "ctx-1",
        "PCLEASE_INSTANCE": "pclease",
    }
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
    sink = query(tmp_path, lf, "parquet", str(out), labels={"dag_id": "etl", "task_id": "load"})
    outcome = await backend.execute(handle, sink)
    assert outcome.ok, outcome
    assert pl.read_parquet(out).equals(lf.collect())
    # The query carries its labels to Polars Cloud, where they show on the query.
    [sent] = [q for q in cloud.queries() if f"pclease.query-id={sink.query_id}" in q["labels"]]
    assert sorted(sent["labels"]) == sorted(
        [f"pclease.query-id={sink.query_id}", "dag_id=etl", "task_id=load"]
    )

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


async def test_distributed_settings_reach_polars_cloud_and_the_output_is_right(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    handle = await running(backend, spec())
    lf = pl.LazyFrame({"a": [1, 2, 3, 4], "b": ["x", "y", "x", "y"]})
    totals = lf.group_by("b").agg(pl.col("a").sum()).sort("b")
    out = tmp_path / "totals.parquet"
    settings = DistributedSettings(
        min_workers=2, max_workers=3, shuffle_format="ipc", shuffle_compression="zstd",
        shuffle_compression_level=5, partitions_per_worker=4, single_worker_ops="forbid",
    )  # fmt: skip
    sink = query(tmp_path, totals, "parquet", str(out), distributed=settings)
    outcome = await backend.execute(handle, sink)
    assert outcome.ok, outcome
    assert pl.read_parquet(out).equals(totals.collect())

    one = query(tmp_path, totals, "collect")
    outcome = await backend.execute(handle, one)
    assert outcome.ok, outcome
    assert one.result_path is not None and pl.read_ipc(one.result_path).equals(totals.collect())

    distributed, single = (
        next(q for q in cloud.queries() if f"pclease.query-id={s.query_id}" in q["labels"])
        for s in (sink, one)
    )
    assert distributed["settings"] == {
        "engine": "auto",
        "mode": "distributed",
        "min_workers": 2,
        "max_workers": 3,
        "shuffle_format": "ipc",
        "shuffle_compression": "zstd",
        "shuffle_compression_level": 5,
        "sort_partitioned": True,
        "pre_aggregation": True,
        "equi_join_broadcast_limit": 256 * 1024**2,
        "partitions_per_worker": 4,
        "single_worker_ops": "forbid",
        "expression_lowering": None,
        "planner": "auto",
    }
    assert single["settings"] == {
        "engine": "auto",
        "mode": "single-node",
        "min_workers": None,
        "max_workers": None,
    }


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
    assert not task.done(), f"the query ended before it was cancelled: {task.result()}"
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
    status = backend.credentials.status()
    assert not status.ok
    assert wrong not in repr(status)
    with pytest.raises(BackendError):
        await backend.start(spec())
    assert cloud.running() == []


async def wait_for(predicate: Any, what: str, timeout_s: float = 15.0) -> Any:
    for _ in range(int(timeout_s / 0.05)):
        if value := predicate():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- starts through manifests -----------------------------------------------------------------


def manifest(cloud: FakePolarsCloud, name: str) -> dict[str, Any]:
    [found] = [m for m in cloud.manifests.snapshot() if m["name"] == name]
    return found


async def test_a_repeated_start_reconnects_to_the_manifests_cluster(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    before = {c["id"] for c in cloud.computes()}
    handle = await running(backend, spec("ctx-1"))
    m = manifest(cloud, "pclease-small-0")
    assert m["live_cluster_id"] == handle["compute_id"]
    assert m["env_vars"]["PCLEASE_CONTEXT_ID"] == "ctx-1"
    assert (m["req_cpu_cores"], m["req_ram_gb"], m["mode"]) == (2, 4, "Proxy")
    assert "pclease.context-id=ctx-1" in m["labels"]

    # The same start again, and from a restarted service: the cluster it made.
    assert await backend.start(spec("ctx-1")) == handle
    restarted = make_backend(cloud, tmp_path)
    assert await restarted.start(spec("ctx-1")) == handle
    assert [c["id"] for c in cloud.computes() if c["id"] not in before] == [handle["compute_id"]]
    assert manifest(cloud, "pclease-small-0")["registrations"] == 1  # live: left as it is
    [observed] = await restarted.list()
    assert (observed.context_id, dict(observed.handle)) == ("ctx-1", dict(handle))


async def test_a_lost_or_timed_out_manifest_start_reconnects(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path, request_timeout_s=1)
    cloud.lose_start_answers = 1
    lost = await backend.start(spec("answer-lost"))
    [compute] = cloud.running()
    assert lost["compute_id"] == compute["id"]

    cloud.hang_start_answers_s = 2  # longer than request_timeout_s
    timed_out = await backend.start(spec("answer-late"))
    cloud.hang_start_answers_s = 0
    assert len(cloud.running()) == 2
    assert timed_out["manifest"] == "pclease-small-1"
    assert timed_out["compute_id"] == manifest(cloud, "pclease-small-1")["live_cluster_id"]
    owners = {o.context_id: o.handle["compute_id"] for o in await backend.list()}
    assert owners == {"answer-lost": lost["compute_id"], "answer-late": timed_out["compute_id"]}


async def test_slots_are_the_lowest_free_and_follow_the_profile(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    large = {"cpus": 8, "memory_gb": 16}
    backend = make_backend(cloud, tmp_path, profiles={"large": large})
    a = await running(backend, spec("a"))
    b = await running(backend, spec("b"))
    big = await running(backend, replace(spec("big"), profile="large", cpus=8, memory_gb=16))
    assert (a["manifest"], b["manifest"]) == ("pclease-small-0", "pclease-small-1")
    assert big["manifest"] == "pclease-large-0"  # two profiles, two manifests
    assert manifest(cloud, "pclease-large-0")["req_cpu_cores"] == 8

    # Slot 0 is freed when its cluster stops; the next context takes it, registered
    # with the profile as it is now.
    await backend.stop(a)
    grown = replace(spec("c"), cpus=4, memory_gb=8)
    c = await running(backend, grown)
    assert c["manifest"] == "pclease-small-0"
    assert c["compute_id"] != a["compute_id"]
    m = manifest(cloud, "pclease-small-0")
    assert (m["registrations"], m["req_cpu_cores"], m["req_ram_gb"]) == (2, 4, 8)
    assert m["env_vars"]["PCLEASE_CONTEXT_ID"] == "c"
    assert m["starts"] == [a["compute_id"], c["compute_id"]]
    owners = {o.context_id: o.handle["manifest"] for o in await backend.list()}
    assert owners == {"b": "pclease-small-1", "big": "pclease-large-0", "c": "pclease-small-0"}


async def test_concurrent_starts_of_one_profile_take_distinct_slots(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    cloud.hang_start_answers_s = 0.5
    handles = await asyncio.gather(*(backend.start(spec(f"c{i}")) for i in range(3)))
    cloud.hang_start_answers_s = 0
    assert sorted(h["manifest"] for h in handles) == [f"pclease-small-{i}" for i in range(3)]
    assert len({h["compute_id"] for h in handles}) == len(cloud.running()) == 3


async def test_a_slot_another_process_took_meanwhile_is_left_to_it(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    real = backend.manifests._start

    async def start_while_a_rival_registers(
        spec: ContextSpec, workspace_id: str, name: str
    ) -> Handle:
        handle = await real(spec, workspace_id, name)
        if name == "pclease-small-0":  # another replica took the same free slot, later
            rival = {"PCLEASE_CONTEXT_ID": "rival", "PCLEASE_INSTANCE": "pclease"}
            cloud.manifests.register(
                cloud.workspace_id,
                {
                    "name": name,
                    "env_vars": rival,
                    "polars_version": "2.0.0",
                    "python_version": "3.11.7",
                },
            )
        return handle

    backend.manifests._start = start_while_a_rival_registers  # type: ignore[method-assign]
    handle = await backend.start(spec("ctx-1"))
    assert handle["manifest"] == "pclease-small-1"
    owners = {o.context_id: o.handle["manifest"] for o in await backend.list()}
    assert owners == {"rival": "pclease-small-0", "ctx-1": "pclease-small-1"}
    assert len(cloud.running()) == 2


async def test_manifests_of_others_are_never_taken_nor_listed(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    # Another deployment's manifest (its instance name is "x") and one registered by hand.
    versions = {"polars_version": "2.0.0", "python_version": {"major": 3, "minor": 11}}
    cloud.manifests.register(
        cloud.workspace_id,
        {"name": "pclease-small-0", "env_vars": {"PCLEASE_INSTANCE": "x"}, **versions},
    )
    user = cloud.auth.subject_for(CLIENT_ID)
    theirs, _ = cloud.manifests.start(cloud.workspace_id, user, "pclease-small-0")
    cloud.manifests.register(cloud.workspace_id, {"name": "pclease-small-1", **versions})
    backend = make_backend(cloud, tmp_path, stop_unknown_computes=True)
    ours = await backend.start(spec("ctx-1"))
    assert ours["manifest"] == "pclease-small-2"
    assert [o.context_id for o in await backend.list()] == ["ctx-1"]
    assert manifest(cloud, "pclease-small-0")["live_cluster_id"] == theirs


async def test_a_cluster_no_longer_its_manifests_is_reported_without_a_context(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    first = await running(backend, spec("first"))
    # The manifest forgets its cluster (as if it had been replaced): the cluster is still
    # this deployment's, by its name, but no context's.
    cloud.manifests.unregister(cloud.workspace_id, "pclease-small-0")
    second = await running(backend, spec("second"))
    assert second["manifest"] == "pclease-small-0"
    owners = {o.handle["compute_id"]: o.context_id for o in await backend.list()}
    assert owners == {first["compute_id"]: None, second["compute_id"]: "second"}


# -- starts whose answer was lost, without manifests (the start ledger) ---------------------


async def test_a_start_whose_answer_was_lost_is_found_and_owned_once(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path, use_manifests=False)
    cloud.lose_start_answers = 1
    handle = await backend.start(spec("lost"))
    [compute] = cloud.running()
    assert handle["compute_id"] == compute["id"]
    assert [(o.context_id, o.handle["compute_id"]) for o in await backend.list()] == [
        ("lost", compute["id"])
    ]
    assert [c["labels"].get(LABEL_CONTEXT_ID) for c in cloud.computes()].count("lost") == 1


async def test_concurrent_starts_never_share_a_compute(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path, use_manifests=False)
    await running(backend, spec("warm-up"))  # workspace and user known: both go straight on
    warm = {c["id"] for c in cloud.running()}
    # B's request creates its compute but its answer is held back; meanwhile A's creates
    # one of the same shape and its answer is lost.
    cloud.hang_start_answers_s = 1.5
    b = asyncio.create_task(backend.start(spec("b")))
    await wait_for(lambda: len(cloud.running()) == len(warm) + 1, "B's compute")
    cloud.hang_start_answers_s = 0.0
    cloud.lose_start_answers = 1
    a = await backend.start(spec("a"))
    b_handle = await b
    assert a["compute_id"] != b_handle["compute_id"]
    owners = {o.handle["compute_id"]: o.context_id for o in await backend.list()}
    assert owners[a["compute_id"]] == "a"
    assert owners[b_handle["compute_id"]] == "b"
    assert len(owners) == 3


async def test_a_stale_pending_entry_never_claims_someone_elses_compute(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path, use_manifests=False)
    await running(backend, spec("first"))
    # The credentials stop working just before the next start sends its request.
    cloud.rotate("pcs_" + secrets.token_urlsafe(8))
    cloud.revoke_tokens()
    with pytest.raises(BackendError, match=r"credentials are not usable|refused"):
        await backend.start(spec("never-sent"))
    cloud.rotate(SECRET, CLIENT_ID)
    # Someone else uses the service account for a context of the very same shape.
    user = cloud.auth.subject_for(CLIENT_ID)
    theirs = cloud.start_compute(
        cloud.workspace_id, user, {"specs": {"cpus": 2, "ram_gb": 4}, "cluster_size": 1}
    )
    restarted = make_backend(cloud, tmp_path, use_manifests=False)
    owners = {o.handle["compute_id"]: o.context_id for o in await restarted.list()}
    assert theirs.id not in owners
    assert list(owners.values()) == ["first"]


async def test_a_pending_entry_claims_nothing_when_two_computes_could_be_its(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path, use_manifests=False)
    cloud.hang_start_answers_s = 12  # longer than request_timeout_s: the start times out
    with pytest.raises(BackendError, match="not retrying"):
        await backend.start(spec("timed-out"))
    cloud.hang_start_answers_s = 0.0
    [created] = cloud.running()
    user = cloud.auth.subject_for(CLIENT_ID)
    cloud.start_compute(
        cloud.workspace_id, user, {"specs": {"cpus": 2, "ram_gb": 4}, "cluster_size": 1}
    )
    # Two same-shape computes: the entry cannot tell which one is its own.
    assert await backend.list() == []
    cloud.stop_compute(cloud.workspace_id, cloud.running()[-1]["id"])
    [observed] = await backend.list()
    assert (observed.context_id, observed.handle["compute_id"]) == ("timed-out", created["id"])


# -- queries that must not run on ------------------------------------------------------------


async def test_an_error_while_waiting_cancels_the_query(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    handle = await running(backend, spec())
    cloud.query_delay_s = 30
    before = len(cloud.queries())
    task = asyncio.create_task(
        backend.execute(handle, query(tmp_path, pl.LazyFrame({"a": [1]}), "collect"))
    )
    await wait_for(lambda: len(cloud.queries()) > before, "the query to arrive")
    cloud.error_burst(3, status=503)  # every status poll fails
    with pytest.raises(BackendError, match="query status failed"):
        await task
    await wait_for(lambda: cloud.queries()[-1]["status"] == "Canceled", "the query to cancel")


async def test_a_submission_that_timed_out_is_cancelled_when_it_lands(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path, request_timeout_s=1)
    handle = await running(backend, spec())
    cloud.query_delay_s = 30
    cloud.hang_submit_answers_s = 2
    with pytest.raises(BackendError) as caught:
        await backend.execute(handle, query(tmp_path, pl.LazyFrame({"a": [1]}), "collect"))
    assert "did not take" not in str(caught.value)
    assert "cancelled as soon as its answer arrives" in str(caught.value)
    await wait_for(
        lambda: cloud.queries() and cloud.queries()[-1]["status"] == "Canceled",
        "the late query to cancel",
    )


async def test_a_result_too_large_on_disk_is_refused_before_it_is_read(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    handle = await running(backend, spec())
    lf = pl.LazyFrame({"a": list(range(10_000))})
    q = query(tmp_path, lf, "collect", max_result_bytes=1000)
    outcome = await backend.execute(handle, q)
    assert outcome.error_type == "ResultTooLarge"
    stored = os.stat(cloud.queries()[-1]["uri"]).st_size
    assert f"the result is {stored} bytes" in (outcome.error_message or "")
    assert q.result_path is not None
    assert not os.path.exists(q.result_path)  # noqa: ASYNC240
    assert not os.path.exists(q.result_path + ".part")  # noqa: ASYNC240


# -- stop and list -----------------------------------------------------------------------------


async def test_stopping_a_vanished_compute_succeeds_even_when_stops_fail(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    backend = make_backend(cloud, tmp_path)
    cloud.fail_stops = 10
    await backend.stop({"workspace_id": cloud.workspace_id, "compute_id": str(uuid.uuid4())})


async def test_one_unknown_workspace_does_not_hide_the_others(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    other = {"cpus": 2, "memory_gb": 4, "workspace": "no-such-workspace"}
    backend = make_backend(cloud, tmp_path, profiles={"other": other})
    await running(backend, spec("ours"))
    assert [o.context_id for o in await backend.list()] == ["ours"]


# -- the process around the client ----------------------------------------------------------


async def test_the_client_runs_without_the_credentials_and_the_service_keeps_its_environment(
    cloud: FakePolarsCloud, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLARS_CLOUD_CLIENT_ID", CLIENT_ID)
    monkeypatch.setenv("POLARS_CLOUD_CLIENT_SECRET", SECRET)
    before = dict(os.environ)
    backend = make_backend(cloud, tmp_path, credentials={"source": "env"})
    assert backend.provider.source.load() == ServiceAccount.of(CLIENT_ID, SECRET)
    await running(backend, spec())
    assert dict(os.environ) == before  # the service's own environment is never edited
    pid = backend.host.pid
    assert pid is not None
    environ = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)
    client_env = environ.split(b"\0")
    names = {line.split(b"=", 1)[0].decode() for line in client_env if line}
    assert "POLARS_CLOUD_CLIENT_ID" not in names
    assert "POLARS_CLOUD_CLIENT_SECRET" not in names
    assert SECRET.encode() not in b"".join(client_env)


class ThreadRecordingHost(ClientHost):
    def __init__(self, api_addr: str, config_dir: Path) -> None:
        super().__init__(client_environment(api_addr, config_dir))
        self.threads: list[str] = []

    def call(self, token: str, method: str, *args: Any, **kwargs: Any) -> Any:
        self.threads.append(threading.current_thread().name)
        return super().call(token, method, *args, **kwargs)


async def test_client_calls_run_on_the_backends_own_threads(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    host = ThreadRecordingHost(cloud.url, tmp_path / "client")
    backend = make_backend(cloud, tmp_path, host=host)
    await backend.list()
    assert host.threads and host.threads[0].startswith("pclease-polars-cloud")
    await backend.close()
    with pytest.raises(BackendError, match="closed"):
        await backend.start(spec())


def test_backend_call_timeout_must_cover_the_slowest_start(tmp_path: Path) -> None:
    base = {"backend": "polars_cloud", "polars_cloud": {"workspace": "ws", "request_timeout_s": 10}}
    assert Settings(**base).backend_call_timeout_s == 181  # unset: the minimum
    with pytest.raises(ConfigError) as caught:
        load_settings(backend_call_timeout_s=60, **base)
    message = str(caught.value)
    assert "backend_call_timeout_s = 60" in message
    assert "polars_cloud.request_timeout_s = 10" in message
    assert "at least 181" in message
    assert Settings(**base, backend_call_timeout_s=200).backend_call_timeout_s == 200


# -- readiness and leases while Polars Cloud or its credentials fail ---------------------------


class RemoteBackend(MemoryBackend):
    """A backend whose list() a probe must not call, as for Polars Cloud."""

    capabilities = Capabilities(list_is_cheap=False)

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.failing: str | None = None
        self.listed = 0

    async def list(self) -> list[Observed]:
        self.listed += 1
        if self.failing:
            raise BackendError(self.failing)
        return await super().list()


async def test_healthz_reads_the_sweeps_and_does_not_flap(h: Harness) -> None:
    backend = RemoteBackend(h.clock)
    h.service.backend = h.service.reconciler.calls.backend = backend

    async def readyz() -> tuple[int, str]:
        # Shown on /healthz; /readyz is this replica's readiness, and stays ready.
        assert (await h.client.get("/readyz")).status_code == 200
        r = await h.client.get("/healthz")
        assert r.status_code == 200
        failing = r.json()["checks"]["backend"].startswith("failing")
        return 503 if failing else 200, r.json()["checks"]["backend"]

    assert await readyz() == (200, "ok (not listed yet)")
    await h.service.reconciler.sweep()
    assert await readyz() == (200, "ok")

    backend.failing = "Polars Cloud list failed 3 times: HTTP 503"
    await h.service.reconciler.sweep()
    status, text = await readyz()
    assert status == 200
    assert "the last listing failed: Polars Cloud list failed 3 times: HTTP 503" in text

    h.clock.advance(h.service.settings.backend_unready_after_s)
    await h.service.reconciler.sweep()
    status, text = await readyz()
    assert status == 503
    assert text.startswith("failing: Polars Cloud list failed 3 times: HTTP 503")

    backend.failing = None
    await h.service.reconciler.sweep()
    assert await readyz() == (200, "ok")
    assert backend.listed == 4  # the sweeps' listings only: no probe listed


async def test_failing_credentials_refuse_only_leases_that_need_a_new_context(
    h: Harness,
) -> None:
    problem = "the Polars Cloud credentials from files a and b do not work: refused"
    first = await h.lease("small", headers={**h.headers, "Idempotency-Key": "k1"})

    async def failing() -> str | None:
        return problem

    h.service.leases.ready_check = failing
    # A replay returns the lease it made.
    again = await h.client.post(
        "/v1/leases", json={"profile": "small"}, headers={**h.headers, "Idempotency-Key": "k1"}
    )
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first["id"]
    # Room in the context it has: granted.
    for _ in range(3):
        joined = await h.lease("small")
        assert joined["context_id"] == first["context_id"]
    # The context is full: a new one would have to start.
    refused = await h.client.post("/v1/leases", json={"profile": "small"}, headers=h.headers)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "backend_unavailable"
    assert problem in refused.json()["error"]["message"]


# -- several replicas on one start ledger (without manifests) -------------------------------


async def test_replicas_sharing_the_ledger_never_take_each_others_computes_for_unknown(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    a = make_backend(cloud, tmp_path, stop_unknown_computes=True, use_manifests=False)
    b = make_backend(cloud, tmp_path / "b", stop_unknown_computes=True, use_manifests=False)
    b.ledger = a.ledger  # two data directories, one database
    await running(a, spec("from-a"))
    [seen] = await b.list()
    assert seen.context_id == "from-a"  # known, not an orphan to stop

    # While A's next start waits for its answer, its compute is on Polars Cloud and in no
    # entry yet: B neither claims it nor reports it as unknown.
    cloud.hang_start_answers_s = 3
    starting = asyncio.create_task(a.start(spec("also-from-a")))
    await wait_for(lambda: len(cloud.running()) == 2, "the second compute to exist")
    assert {o.context_id for o in await b.list()} == {"from-a"}
    handle = await starting
    assert {o.context_id for o in await b.list()} == {"from-a", "also-from-a"}
    assert dict(handle)["compute_id"] in {c["id"] for c in cloud.running()}
    # A compute nobody recorded is still stopped: the setting keeps its meaning.
    user = cloud.auth.subject_for(CLIENT_ID)
    orphan = cloud.start_compute(cloud.workspace_id, user, {"cluster_size": 1})
    unknown = [o for o in await b.list() if o.context_id is None]
    assert [o.handle["compute_id"] for o in unknown] == [orphan.id]


async def test_a_start_whose_maker_died_is_resolved_by_another_replica(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    def of_context(context_id: str) -> list[dict[str, Any]]:
        return [c for c in cloud.computes() if c["labels"].get(LABEL_CONTEXT_ID) == context_id]

    ctx = f"ctx-{uuid.uuid4().hex[:8]}"  # the fake keeps the computes of earlier tests
    a = make_backend(cloud, tmp_path, request_timeout_s=2, use_manifests=False)
    b = make_backend(cloud, tmp_path / "b", request_timeout_s=2, use_manifests=False)
    b.ledger = a.ledger
    # A sends the start and dies before the answer comes (its task is cancelled mid-call,
    # as SIGKILL would leave it): the compute exists, the entry is pending.
    cloud.hang_start_answers_s = 4
    dying = asyncio.create_task(a.start(replace(spec(ctx), fence=1)))
    await wait_for(lambda: len(cloud.running()) == 1, "the compute to exist")
    dying.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await dying
    cloud.hang_start_answers_s = 0.0
    [pending] = await asyncio.to_thread(a.ledger.entries)
    assert (pending.context_id, pending.compute_id, pending.fence) == (ctx, None, 1)

    # A stale claim of the context (an older fence) may not start it at all.
    with pytest.raises(BackendError, match="claimed again"):
        await b.start(replace(spec(ctx), fence=0))
    # The newer claim waits until A's request could no longer answer, then finds what it
    # made instead of starting a second compute.
    handle = await b.start(replace(spec(ctx), fence=2))
    [compute] = cloud.running()
    assert dict(handle) == {"workspace_id": cloud.workspace_id, "compute_id": compute["id"]}
    assert len(of_context(ctx)) == 1
    [entry] = await asyncio.to_thread(b.ledger.entries)
    assert entry.compute_id == compute["id"]
    # Starting it again (the handle was not saved) returns the same compute.
    assert dict(await b.start(replace(spec(ctx), fence=3))) == dict(handle)
    assert len(of_context(ctx)) == 1


async def test_the_ledger_files_of_an_earlier_release_move_into_the_database(
    cloud: FakePolarsCloud, tmp_path: Path
) -> None:
    old = make_backend(cloud, tmp_path, use_manifests=False)
    handle = await running(old, spec("from-files"))
    await asyncio.to_thread(old.ledger.forget, (await asyncio.to_thread(old.ledger.entries))[0])
    folder = tmp_path / "svc" / "polars_cloud" / "ledger"
    folder.mkdir(parents=True)
    entry = {
        "context_id": "from-files",
        "workspace_id": cloud.workspace_id,
        "compute_id": handle["compute_id"],
        "requested_at": time.time() - 60,
        "cpus": 2,
        "memory_gb": 3.5,
        "cluster_size": 1,
    }
    (folder / "from-files.json").write_text(json.dumps(entry))
    (folder / "broken.json").write_text("{not json")
    # The upgraded release starts through manifests; the ledger still knows this compute.
    upgraded = make_backend(cloud, tmp_path, stop_unknown_computes=True)
    [seen] = await upgraded.list()
    assert (seen.context_id, seen.handle["compute_id"]) == ("from-files", handle["compute_id"])
    # Moved; an unreadable file is left for people to look at (and logged).
    assert [p.name for p in folder.glob("*.json")] == ["broken.json"]
    [kept] = await asyncio.to_thread(upgraded.ledger.entries)
    assert kept.compute_id == handle["compute_id"]
