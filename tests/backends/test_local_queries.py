"""LocalBackend.execute with a real worker: targets, the plan guard, failures, cancellation.

One context serves the whole module (starting one costs a second or two); tests that kill
its executor (timeout, cancellation, memory) also check that the next query still runs.
Plans are built the way Polars Cloud's client builds them: ``sink_*(..., lazy=True)`` then
``prepare_cloud_plan``.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import pickle
import shutil
import socket
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pytest
from polars._utils.cloud import prepare_cloud_plan
from polars.plugins import register_plugin_function

from pclease_service.backends import local
from pclease_service.backends.base import (
    LABEL_CONTEXT_ID,
    ContextSpec,
    Handle,
    Phase,
    QueryOutcome,
    QuerySpec,
)
from pclease_service.backends.local import LocalBackend
from pclease_service.errors import PlanRefused
from pclease_service.plans import guard
from pclease_service.plans.header import HEADER_LEN, read_header
from pclease_service.plans.targets import IN_MEMORY_SINK, QueryTarget
from tests.moto import moto_server

SOURCE = pl.DataFrame({"id": list(range(1000)), "group": [f"g{i % 3}" for i in range(1000)]})
EVEN = SOURCE.filter(pl.col("id") % 2 == 0)


def plan_of(lf: pl.LazyFrame) -> bytes:
    plan, _flags = prepare_cloud_plan(lf)
    return plan


def slow_query() -> pl.LazyFrame:
    """A streaming cross join of 10^10 rows: minutes of one CPU, megabytes of memory."""
    a = pl.LazyFrame().select(x=pl.int_range(0, 100_000))
    joined = a.join(a.select(y=pl.col("x")), how="cross")
    return joined.filter((pl.col("x") * 7 + pl.col("y")) % 13 == 0).select(pl.len())


def nothing_at(*paths: Path) -> bool:
    """Not even a dangling symlink, at the path or where it resolves to."""
    return not any(os.path.lexists(q) for p in paths for q in (p, os.path.realpath(p)))


@dataclass
class Context:
    backend: LocalBackend
    handle: Handle
    tmp: Path

    @property
    def root(self) -> Path:
        return self.tmp / "data"

    @property
    def outside(self) -> Path:
        return self.tmp / "outside"

    @property
    def denied(self) -> Path:
        return self.root / ".pclease"

    @property
    def result(self) -> Path:
        return self.tmp / "service" / "result.arrow"

    def spec(self, target: QueryTarget, plan: bytes, **changes: Any) -> QuerySpec:
        spec = QuerySpec(
            query_id="q-test",
            plan=plan,
            target=target,
            result_path=str(self.result) if target is QueryTarget.COLLECT else None,
            timeout_s=60,
            data_roots=(str(self.root),),
            denied_paths=(str(self.denied),),
        )
        return replace(spec, **changes)

    async def execute(self, target: QueryTarget, plan: bytes, **changes: Any) -> QueryOutcome:
        return await self.backend.execute(self.handle, self.spec(target, plan, **changes))

    async def collect(self, lf: pl.LazyFrame, **changes: Any) -> pl.DataFrame:
        plan = plan_of(lf.sink_parquet(IN_MEMORY_SINK, lazy=True))
        outcome = await self.execute(QueryTarget.COLLECT, plan, **changes)
        assert outcome.ok, outcome
        return pl.read_ipc(self.result)

    async def executor_pid(self) -> int | None:
        pid: int | None = (await self.backend.ping(self.handle))["executor_pid"]
        return pid


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    tmp = tmp_path_factory.mktemp("queries")
    for directory in ("data", "data/.pclease", "outside", "service"):
        (tmp / directory).mkdir()
    SOURCE.write_parquet(tmp / "data" / "source.parquet")
    backend = LocalBackend(tmp / "state")
    spec = ContextSpec(
        context_id="ctx-queries",
        profile="small",
        cpus=1,
        memory_gb=1,
        labels={LABEL_CONTEXT_ID: "ctx-queries"},
    )

    async def start() -> Handle:
        handle = await backend.start(spec)
        deadline = time.monotonic() + 20
        while (await backend.status(handle)).phase is not Phase.RUNNING:
            assert time.monotonic() < deadline, "the worker never came up"
            await asyncio.sleep(0.05)
        return handle

    handle = asyncio.run(start())
    try:
        yield Context(backend, handle, tmp)
    finally:
        asyncio.run(backend.stop(handle))
        assert not _is_running(int(handle["pid"]))


@pytest.fixture(autouse=True)
def clean_outputs(ctx: Context) -> Iterator[None]:
    yield
    ctx.result.unlink(missing_ok=True)
    for path in ctx.root.glob("out*"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# -- targets --------------------------------------------------------------------------------
READERS = {
    QueryTarget.PARQUET: pl.read_parquet,
    QueryTarget.CSV: pl.read_csv,
    QueryTarget.IPC: pl.read_ipc,
    QueryTarget.NDJSON: pl.read_ndjson,
}


@pytest.mark.parametrize("target", list(READERS), ids=lambda t: t.value)
async def test_each_sink_format_writes_its_rows(ctx: Context, target: QueryTarget) -> None:
    out = ctx.root / f"out.{target.value}"
    query = pl.scan_parquet(ctx.root / "source.parquet").filter(pl.col("id") % 2 == 0)
    sink = getattr(query, f"sink_{target.value}")(out, lazy=True)

    outcome = await ctx.execute(target, plan_of(sink))

    assert outcome == QueryOutcome(
        ok=True, rows=500, result_bytes=out.stat().st_size, output=str(out)
    )
    assert READERS[target](out).equals(EVEN)


@pytest.mark.parametrize("engine", ["auto", "streaming", "in-memory"])
async def test_collect_writes_the_result_as_arrow_ipc(ctx: Context, engine: str) -> None:
    query = (
        pl.scan_parquet(ctx.root / "source.parquet")
        .group_by("group")
        .agg(pl.len().alias("n"), pl.col("id").sum())
        .sort("group")
    )
    plan = plan_of(query.sink_parquet(IN_MEMORY_SINK, lazy=True))

    outcome = await ctx.execute(QueryTarget.COLLECT, plan, engine=engine)

    assert outcome == QueryOutcome(
        ok=True, rows=3, result_bytes=ctx.result.stat().st_size, output=str(ctx.result)
    )
    assert pl.read_ipc(ctx.result).equals(query.collect())
    assert nothing_at(Path(f"{ctx.result}.partial"))


async def test_an_unknown_engine_is_refused(ctx: Context) -> None:
    plan = plan_of(pl.LazyFrame({"a": [1]}).sink_parquet(IN_MEMORY_SINK, lazy=True))

    outcome = await ctx.execute(QueryTarget.COLLECT, plan, engine="gpu")

    assert outcome.error_type == "InvalidQuery"
    assert outcome.error_message == "engine must be one of auto, in-memory, streaming, not 'gpu'"


async def test_the_plan_must_end_the_way_the_target_says(ctx: Context) -> None:
    lf = pl.scan_parquet(ctx.root / "source.parquet")
    csv = plan_of(lf.sink_csv(ctx.root / "out.csv", lazy=True))

    as_parquet = await ctx.execute(QueryTarget.PARQUET, csv)
    as_collect = await ctx.execute(QueryTarget.COLLECT, csv)
    no_sink = await ctx.execute(QueryTarget.CSV, lf.serialize())

    assert as_parquet.error_message == (
        "the query's target is parquet but the plan sinks csv; make them agree"
    )
    assert as_collect.error_type == "PlanRefused"
    assert "submit it as a csv sink instead" in str(as_collect.error_message)
    assert no_sink.error_type == "PlanRefused"
    assert not (ctx.root / "out.csv").exists()


async def test_queries_on_one_context_run_one_after_the_other(ctx: Context) -> None:
    plans = [
        plan_of(pl.LazyFrame({"a": list(range(n))}).sink_ipc(ctx.root / f"out{n}.ipc", lazy=True))
        for n in (1, 2, 3)
    ]

    outcomes = await asyncio.gather(*(ctx.execute(QueryTarget.IPC, p) for p in plans))

    assert [o.rows for o in outcomes] == [1, 2, 3]


# -- failures -------------------------------------------------------------------------------
async def test_a_polars_error_carries_its_type_and_message(ctx: Context) -> None:
    missing_column = pl.scan_parquet(ctx.root / "source.parquet").select("nope")
    missing_file = pl.scan_parquet(ctx.root / "absent.parquet")

    column = await ctx.execute(
        QueryTarget.COLLECT, plan_of(missing_column.sink_parquet(IN_MEMORY_SINK, lazy=True))
    )
    file = await ctx.execute(
        QueryTarget.COLLECT, plan_of(missing_file.sink_parquet(IN_MEMORY_SINK, lazy=True))
    )

    assert column.error_type == "ColumnNotFoundError"
    assert str(column.error_message).startswith('unable to find column "nope"')
    assert "Resolved plan until failure" not in str(column.error_message)
    assert file.error_type == "FileNotFoundError"
    assert "absent.parquet" in str(file.error_message)
    assert not ctx.result.exists()


async def test_a_result_over_max_result_bytes_is_refused_with_a_hint(ctx: Context) -> None:
    plan = plan_of(
        pl.scan_parquet(ctx.root / "source.parquet").sink_parquet(IN_MEMORY_SINK, lazy=True)
    )

    outcome = await ctx.execute(QueryTarget.COLLECT, plan, max_result_bytes=1000)

    assert outcome.error_type == "ResultTooLarge"
    assert "more than this service returns (1000 bytes, max_result_bytes)" in str(
        outcome.error_message
    )
    assert "sink it to a file" in str(outcome.error_message)
    assert not ctx.result.exists()
    assert nothing_at(Path(f"{ctx.result}.partial"))


async def test_malformed_truncated_and_foreign_plans_fail_clearly(ctx: Context) -> None:
    good = plan_of(pl.LazyFrame({"a": [1, 2]}).sink_parquet(IN_MEMORY_SINK, lazy=True))
    header = read_header(good)
    newer = replace(header, major=header.major + 1).encode() + good[HEADER_LEN:]
    other_schema = replace(header, schema_hash="0" * 64).encode() + good[HEADER_LEN:]
    damaged = good[:HEADER_LEN] + b"\xc1" + good[HEADER_LEN + 1 :]

    outcomes = {
        name: await ctx.execute(QueryTarget.COLLECT, plan)
        for name, plan in {
            "random": os.urandom(4096),
            "empty": b"",
            "truncated": good[: len(good) // 2],
            "damaged": damaged,
            "newer": newer,
            "other_schema": other_schema,
        }.items()
    }

    assert {k: o.error_type for k, o in outcomes.items()} == {
        "random": "PlanInvalid",
        "empty": "PlanInvalid",
        "truncated": "PlanInvalid",
        "damaged": "PlanInvalid",
        "newer": "PlanVersionMismatch",
        "other_schema": "PlanVersionMismatch",
    }
    assert "truncated" in str(outcomes["truncated"].error_message)
    assert outcomes["newer"].error_message == (
        f"the plan was built by a Polars with DSL {header.major + 1}.0, schema "
        f"{header.schema_hash[:12]}, but this context runs polars {pl.__version__} "
        f"({header.describe()}); build the plan with polars=={pl.__version__}"
    )
    assert (await ctx.backend.status(ctx.handle)).phase is Phase.RUNNING
    assert (await ctx.collect(pl.LazyFrame({"a": [1]}))).height == 1


async def test_a_timeout_kills_the_query_and_the_context_lives_on(ctx: Context) -> None:
    plan = plan_of(slow_query().sink_parquet(IN_MEMORY_SINK, lazy=True))
    executor = await ctx.executor_pid()

    t0 = time.monotonic()
    outcome = await ctx.execute(QueryTarget.COLLECT, plan, timeout_s=1.0, engine="streaming")

    assert time.monotonic() - t0 < 3
    assert outcome.error_type == "QueryTimeout"
    assert outcome.error_message == (
        "the query did not finish within its timeout of 1 s and was stopped; "
        "raise timeout_s or make the query cheaper"
    )
    assert await ctx.executor_pid() != executor
    assert (await ctx.collect(pl.LazyFrame({"a": [1, 2]}))).height == 2


async def test_cancelling_the_task_stops_the_query_promptly(ctx: Context) -> None:
    plan = plan_of(slow_query().sink_parquet(IN_MEMORY_SINK, lazy=True))
    await ctx.collect(pl.LazyFrame({"a": [1]}))  # a warm executor, so the query is running
    executor = await ctx.executor_pid()
    task = asyncio.create_task(ctx.execute(QueryTarget.COLLECT, plan, engine="streaming"))
    await asyncio.sleep(1.0)
    assert not task.done()

    t0 = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - t0 < 1.0

    deadline = time.monotonic() + 5
    while _is_running(executor):
        assert time.monotonic() < deadline, "the cancelled query's executor still runs"
        await asyncio.sleep(0.05)
    assert (await ctx.collect(pl.LazyFrame({"a": [1, 2, 3]}))).height == 3


async def test_queries_reuse_a_kept_connection_and_a_broken_one_is_replaced(
    ctx: Context,
) -> None:
    pool, ref = ctx.backend._connections, ctx.backend._ref(ctx.handle)
    await ctx.collect(pl.LazyFrame({"a": [1]}))
    kept = pool.take(ref)
    assert kept is not None
    pool.give_back(ref, kept)
    assert (await ctx.collect(pl.LazyFrame({"a": [1, 2]}))).height == 2
    assert pool.take(ref) is kept  # the query ran on it and gave it back

    # It breaks while idle, as when the worker drops it: the next query opens a new one.
    sock = socket.socket(fileno=kept.fileno())
    sock.shutdown(socket.SHUT_RDWR)
    sock.detach()
    pool.give_back(ref, kept)
    assert (await ctx.collect(pl.LazyFrame({"a": [1, 2, 3]}))).height == 3
    assert kept.closed
    fresh = pool.take(ref)
    assert fresh is not None and fresh is not kept
    pool.give_back(ref, fresh)


def test_a_request_on_a_kept_connection_its_worker_closed_may_be_sent_again() -> None:
    ours, theirs = socket.socketpair()
    theirs.close()
    with Connection(ours.detach()) as conn:
        with pytest.raises(local._Unsent):
            local._exchange(conn, {"op": "ping"}, None, 1.0, kept=True)
        # On a new connection the same failure says the worker is not answering.
        with pytest.raises(local._NotAnswering, match="the connection broke"):
            local._exchange(conn, {"op": "ping"}, None, 1.0)


def _is_running(pid: int | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


# -- Python functions -----------------------------------------------------------------------
class _TouchWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


PYTHON_IN_PLANS = {
    # Only expression UDFs carry the PLPYFN marker; the others are bare pickles.
    "expression UDF": lambda lf: lf.select(pl.col("a").map_batches(lambda s: s)),
    "LazyFrame.map_batches": lambda lf: lf.map_batches(lambda df: df),
    "name.map": lambda lf: lf.select(pl.all().name.map(lambda name: name)),
    "pipe_with_schema": lambda lf: lf.pipe_with_schema(lambda lf, schema: lf),
}


def udf_plan(marker: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> bytes:
    """A plan with Python in it whose pickle creates ``marker`` when Polars unpickles it.

    Polars pickles functions with cloudpickle, which is not installed here; a stand-in
    module that pickles the payload above produces the same plan layout."""
    stand_in = types.ModuleType("cloudpickle")
    stand_in.dumps = lambda obj, *a, **k: pickle.dumps(_TouchWhenUnpickled(marker))  # type: ignore[attr-defined]
    stand_in.loads = pickle.loads  # type: ignore[attr-defined]
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "cloudpickle", stand_in)
        lf = PYTHON_IN_PLANS[case](pl.LazyFrame({"a": [1]}))
        return plan_of(lf.sink_parquet(IN_MEMORY_SINK, lazy=True))


@pytest.mark.parametrize("case", list(PYTHON_IN_PLANS))
async def test_python_in_a_plan_is_refused_without_running(
    ctx: Context, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    marker = ctx.outside / "udf-ran"
    plan = udf_plan(marker, monkeypatch, case)

    refused = await ctx.execute(QueryTarget.COLLECT, plan)

    assert refused.error_type == "PlanRefused"
    assert "allow_python_udfs = true" in str(refused.error_message)
    assert not marker.exists()


async def test_the_refused_udf_plan_does_run_where_udfs_are_allowed(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Proves the plans above are armed: only the refusal kept their pickles from running.
    marker = ctx.outside / "udf-ran"
    plan = udf_plan(marker, monkeypatch, "LazyFrame.map_batches")

    await ctx.execute(QueryTarget.COLLECT, plan, allow_python_udfs=True)

    assert marker.exists()
    marker.unlink()


async def test_a_default_credential_provider_is_refused(ctx: Context) -> None:
    # storage_options without credential_provider=None pickle polars' "auto" provider.
    scan = pl.scan_parquet("s3://bucket/prefix/x.parquet", storage_options={"aws_region": "x"})

    outcome = await ctx.execute(
        QueryTarget.COLLECT,
        plan_of(scan.sink_parquet(IN_MEMORY_SINK, lazy=True)),
        data_roots=("s3://bucket/prefix/",),
    )

    assert outcome.error_type == "PlanRefused"
    assert "pass credential_provider=None" in str(outcome.error_message)


# -- paths ----------------------------------------------------------------------------------
def _make_fixtures(ctx: Context) -> None:
    secret = ctx.outside / "secret.csv"
    if secret.exists():
        return
    # A FIFO with no writer: opening it for reading blocks, so a query that tried to read it
    # would hang until its timeout instead of being refused at once.
    os.mkfifo(ctx.outside / "config.fifo")
    secret.write_text("password\nhunter2\n")
    (ctx.root / "link-dir").symlink_to(ctx.outside, target_is_directory=True)
    (ctx.root / "link-file.csv").symlink_to(secret)
    (ctx.root / "tables").mkdir()
    SOURCE.write_csv(ctx.root / "tables" / "part1.csv")
    (ctx.root / "tables" / "part2.csv").symlink_to(secret)
    (ctx.denied / "db.csv").write_text("a\n1\n")
    (ctx.root / "libplugin.so").write_bytes(b"")


def _scan(path: str | Path) -> bytes:
    scan = pl.scan_csv(path, credential_provider=None)
    return plan_of(scan.sink_parquet(IN_MEMORY_SINK, lazy=True))


READS = {
    "outside file": ("{outside}/config.fifo", "{outside}/config.fifo"),
    "dot-dot escape": ("{root}/../outside/config.fifo", "resolves to '{outside}/config.fifo'"),
    "symlinked dir": ("{root}/link-dir/config.fifo", "resolves to '{outside}/config.fifo'"),
    "symlinked file": ("{root}/link-file.csv", "resolves to '{outside}/secret.csv'"),
    "glob over a symlink": ("{root}/tables/*.csv", "'{root}/tables/part2.csv'"),
    "denied path": ("{root}/.pclease/db.csv", "inside '{root}/.pclease'"),
    "root covering a denied path": ("{root}", "which covers '{root}/.pclease'"),
    "relative path": ("data/source.csv", "a relative path"),
    "file URI": ("file://{outside}/config.fifo", "instead of a file: URI"),
    "object store outside the roots": ("s3://bucket/x.csv", "'s3://bucket/x.csv', outside"),
}


@pytest.mark.parametrize("case", list(READS))
async def test_a_scan_outside_the_roots_is_refused_before_it_reads(ctx: Context, case: str) -> None:
    _make_fixtures(ctx)
    path, expected = (s.format(root=ctx.root, outside=ctx.outside) for s in READS[case])

    t0 = time.monotonic()
    outcome = await ctx.execute(QueryTarget.COLLECT, _scan(path), timeout_s=10)

    assert outcome.error_type == "PlanRefused", outcome
    assert expected in str(outcome.error_message)
    assert time.monotonic() - t0 < 5, "refused only after trying to read"
    assert not ctx.result.exists()


WRITES = {
    "outside dir": ("{outside}/out.parquet", "{outside}/out.parquet"),
    "dot-dot escape": ("{root}/../outside/out.parquet", "resolves to '{outside}/out.parquet'"),
    "symlinked dir": ("{root}/link-dir/out.parquet", "resolves to '{outside}/out.parquet'"),
    "denied path": ("{root}/.pclease/out.parquet", "inside '{root}/.pclease'"),
    "service result file": ("{tmp}/service/out.parquet", "outside the profile's data roots"),
}


@pytest.mark.parametrize("case", list(WRITES))
async def test_a_sink_outside_the_roots_is_refused_without_creating_it(
    ctx: Context, case: str
) -> None:
    _make_fixtures(ctx)
    path, expected = (
        s.format(root=ctx.root, outside=ctx.outside, tmp=ctx.tmp) for s in WRITES[case]
    )
    sink = pl.LazyFrame({"a": [1]}).sink_parquet(path, lazy=True)

    outcome = await ctx.execute(QueryTarget.PARQUET, plan_of(sink))

    assert outcome.error_type == "PlanRefused", outcome
    assert expected in str(outcome.error_message)
    assert str(ctx.root) in str(outcome.error_message) or "pclease keeps" in str(
        outcome.error_message
    )
    assert nothing_at(Path(path))


async def test_a_nested_sink_and_the_in_memory_placeholder_are_checked_too(ctx: Context) -> None:
    to_memory = pl.LazyFrame({"a": [1]}).sink_parquet(IN_MEMORY_SINK, lazy=True)

    outcome = await ctx.execute(QueryTarget.PARQUET, plan_of(to_memory))

    assert outcome.error_type == "PlanRefused"
    assert "only a collect query may do" in str(outcome.error_message)
    assert not (ctx.tmp / "state" / "workers" / "ctx-queries" / IN_MEMORY_SINK).exists()


async def test_native_plugins_and_credential_files_are_refused(ctx: Context) -> None:
    _make_fixtures(ctx)
    plugin = register_plugin_function(
        plugin_path=ctx.root / "libplugin.so", function_name="f", args=[pl.col("a")]
    )
    with_plugin = pl.LazyFrame({"a": [1]}).select(plugin)
    with_key_file = pl.scan_parquet(
        "gs://bucket/data/x.parquet",
        storage_options={"google_service_account": str(ctx.outside / "secret.csv")},
        credential_provider=None,
    )

    plugin_outcome = await ctx.execute(
        QueryTarget.COLLECT, plan_of(with_plugin.sink_parquet(IN_MEMORY_SINK, lazy=True))
    )
    key_outcome = await ctx.execute(
        QueryTarget.COLLECT,
        plan_of(with_key_file.sink_parquet(IN_MEMORY_SINK, lazy=True)),
        data_roots=("gs://bucket/data/",),
    )

    assert plugin_outcome.error_type == "PlanRefused"
    assert "native expression plugin" in str(plugin_outcome.error_message)
    assert key_outcome.error_type == "PlanRefused"
    assert "ServiceAccount" in str(key_outcome.error_message)


# -- object storage -------------------------------------------------------------------------
@dataclass
class S3:
    endpoint: str
    client: Any

    @property
    def options(self) -> dict[str, str]:
        return {
            "aws_endpoint_url": self.endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "aws_region": "us-east-1",
            "aws_allow_http": "true",
        }

    def keys(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket="bucket")
        return sorted(o["Key"] for o in listed.get("Contents", []))


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with moto_server() as endpoint:
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="bucket")
        yield S3(endpoint, client)


async def test_s3_sink_and_scan_inside_the_prefix(ctx: Context, s3: S3) -> None:
    roots = ("s3://bucket/prefix/", str(ctx.root))
    uri = "s3://bucket/prefix/even.parquet"
    query = pl.scan_parquet(ctx.root / "source.parquet").filter(pl.col("id") % 2 == 0)
    sink = query.sink_parquet(uri, lazy=True, storage_options=s3.options, credential_provider=None)

    written = await ctx.execute(QueryTarget.PARQUET, plan_of(sink), data_roots=roots)

    assert written == QueryOutcome(ok=True, rows=500, result_bytes=None, output=uri)
    assert s3.keys() == ["prefix/even.parquet"]
    scan = pl.scan_parquet(uri, storage_options=s3.options, credential_provider=None)
    assert (await ctx.collect(scan.sort("id"), data_roots=roots)).equals(EVEN)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/other/out.parquet",
        "s3://bucket/prefix-other/out.parquet",
        "s3://bucket/prefix/../other/out.parquet",
        "s3://other-bucket/prefix/out.parquet",
    ],
)
async def test_s3_outside_the_prefix_is_refused(ctx: Context, s3: S3, uri: str) -> None:
    sink = pl.LazyFrame({"a": [1]}).sink_parquet(
        uri, lazy=True, storage_options=s3.options, credential_provider=None
    )

    outcome = await ctx.execute(
        QueryTarget.PARQUET, plan_of(sink), data_roots=("s3://bucket/prefix/",)
    )

    assert outcome.error_type == "PlanRefused"
    assert uri in str(outcome.error_message)
    assert s3.keys() in ([], ["prefix/even.parquet"])


# -- the guard on crafted plans (no worker needed) --------------------------------------------
def msgpack(value: Any) -> bytes:
    """Just enough MessagePack to write plans by hand."""
    if value is None:
        return b"\xc0"
    if isinstance(value, int):
        return bytes([value]) if 0 <= value < 0x80 else b"\xcd" + value.to_bytes(2, "big")
    if isinstance(value, str):
        data = value.encode()
        return b"\xd9" + bytes([len(data)]) + data
    if isinstance(value, list):
        return b"\xdc" + len(value).to_bytes(2, "big") + b"".join(map(msgpack, value))
    items = b"".join(msgpack(k) + msgpack(v) for k, v in value.items())
    return b"\xde" + len(value).to_bytes(2, "big") + items


def crafted(node: Any) -> bytes:
    header = read_header(pl.LazyFrame().serialize())
    tree = {
        "root": {"idx": 1, "version": 1},
        "dataframes": [],
        "dsl_plans": [{"value": None, "version": 0}, {"value": node, "version": 1}],
    }
    return header.encode() + msgpack(tree)


def test_the_guard_is_verified_for_the_installed_polars() -> None:
    # Fails on a Polars upgrade: check the new DSL schema's scans, sinks and Python
    # objects against the plan guard, then add its hash to VERIFIED_SCHEMA_HASHES.
    header = read_header(pl.LazyFrame().serialize())
    assert header.schema_hash in guard.VERIFIED_SCHEMA_HASHES


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({"Scan": ["/etc/passwd", {}, "Csv"]}, "'Scan' entry this guard cannot read"),
        ({7: {"sources": {"Paths": [{"inner": "/etc/passwd"}]}}}, "map key as something other"),
        ({"Scan": {"sources": {"Files": []}}}, "'Scan' entry this guard cannot read"),
        (
            {"Sink": {"input": None, "payload": {"File": {"target": "/etc/x"}}}},
            "'File sink' entry",
        ),
    ],
    ids=["struct as array", "integer key", "unknown sources", "sink target shape"],
)
def test_plans_in_shapes_polars_never_writes_are_refused(node: Any, message: str) -> None:
    with pytest.raises(PlanRefused) as refused:
        guard.inspect(crafted(node), allow_python_udfs=False)

    assert refused.value.error_type == "PlanRefused"
    assert message in refused.value.message


def test_a_bare_pickle_anywhere_is_refused() -> None:
    payload = list(b"\x00\x0b\x07" + pickle.dumps(_TouchWhenUnpickled(Path("/tmp/x"))))
    node = {"MapFunction": {"input": None, "function": {"SomethingNew": {"f": payload}}}}

    with pytest.raises(PlanRefused, match="pickled Python object at") as refused:
        guard.inspect(crafted(node), allow_python_udfs=False)

    assert "SomethingNew/f" in refused.value.message
    guard.inspect(crafted(node), allow_python_udfs=True)
