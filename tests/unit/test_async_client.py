"""The asynchronous client against the fake service: the synchronous client's methods with
the same answers and errors, an asyncio lease (heartbeats, its end noticed at once, queries)
and a lease handed between holders without its token. The same requests reach the real
service in tests/api/test_client_contract.py and, from a real Airflow triggerer, in
tests/airflow/test_airflow_deferrable.py."""

from __future__ import annotations

import asyncio
import inspect
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import polars as pl
import pytest

from pclease_client import (
    AsyncPcleaseClient,
    HandleState,
    LeaseClosed,
    LeaseLost,
    LeaseRef,
    LeaseState,
    PcleaseClient,
    QueryState,
    calls,
)
from pclease_client.errors import LeaseNotFound, UnknownProfile
from pclease_client.testing import FakePclease, QueryOutcome

#: What the synchronous client has that an event loop has no use for (see pclease_client.aio).
SYNC_ONLY = {"close", "release_once", "release_holder_once", "watchdog_for"}
#: Same name, an asynchronous way to do it.
ASYNC_ONLY = {"aclose"}


@pytest.fixture
def fake() -> Iterator[FakePclease]:
    with FakePclease(["small"], lease_ttl_s=30) as fake:
        yield fake


@pytest.fixture
async def client(fake: FakePclease) -> AsyncIterator[AsyncPcleaseClient]:
    async with fake.async_client() as client:
        yield client


def _public(cls: type) -> dict[str, inspect.Signature]:
    """Public methods and their parameters (the return types differ: Lease, AsyncLease)."""
    return {
        name: inspect.signature(member).replace(return_annotation=inspect.Signature.empty)
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


def test_every_method_of_the_synchronous_client_has_its_asynchronous_twin() -> None:
    sync, aio = _public(PcleaseClient), _public(AsyncPcleaseClient)
    assert set(sync) - SYNC_ONLY == set(aio) - ASYNC_ONLY
    for name in set(sync) - SYNC_ONLY - {"lease", "attach"}:
        assert inspect.iscoroutinefunction(getattr(AsyncPcleaseClient, name)) != (
            name in ("hold",)
        ), name
        assert str(aio[name]) == str(sync[name]), name
    # lease() has no watchdog and no on_created (nothing signals an event loop's task);
    # attach() takes a LeaseInfo, as reading one by id would be I/O.
    lease_params = set(sync["lease"].parameters) - {"on_created", "watchdog"}
    assert set(aio["lease"].parameters) == lease_params


async def test_answers_and_errors_are_those_of_the_synchronous_client(
    fake: FakePclease, client: AsyncPcleaseClient
) -> None:
    (profile,) = await client.list_profiles()
    assert profile.name == "small"
    info = await client.create_lease("small", holder={"dag_id": "etl"})
    with fake.client() as sync:
        assert sync.get_lease(info.id) == await client.get_lease(info.id)
    with pytest.raises(LeaseNotFound):
        await client.get_lease("no-such-lease")
    with pytest.raises(UnknownProfile):
        await client.create_lease("huge")
    fake.fail_requests(2)  # 503 twice: retried, as the synchronous client does
    assert (await client.heartbeat(info.id)).id == info.id


async def test_a_lease_heartbeats_runs_queries_and_is_released(
    fake: FakePclease, client: AsyncPcleaseClient
) -> None:
    result = pl.DataFrame({"n": [1, 4, 9]})
    fake.answer_queries(
        lambda q: QueryOutcome(result=result) if q.target == "collect" else QueryOutcome(rows=3)
    )
    fake.report_inputs(lambda q: ["/lake/in.csv"])
    async with client.lease("small", labels={"team": "data"}, polars_errors=True) as lease:
        assert lease.handle_state is HandleState.HELD
        assert (await lease.remote(pl.LazyFrame({"n": [1]})).collect()).equals(result)
        written = await lease.remote(pl.LazyFrame({"n": [1]})).sink_parquet("/lake/out.parquet")
        assert (written.state, written.rows) == (QueryState.SUCCEEDED, 3)
        assert (written.inputs, written.outputs) == (("/lake/in.csv",), ("/lake/out.parquet",))
        fake.fail_queries("ColumnNotFoundError", 'unable to find column "x"')
        with pytest.raises(pl.exceptions.ColumnNotFoundError):
            await lease.remote(pl.LazyFrame({"n": [1]})).collect()
    assert fake.lease(lease.id).state is LeaseState.RELEASED
    assert {dict(q.labels)["team"] for q in fake.queries(lease_id=lease.id)} == {"data"}
    with pytest.raises(LeaseClosed):
        lease.remote(pl.LazyFrame({"n": [1]}))


async def test_a_large_result_goes_through_a_file_and_downloads_like_the_synchronous_one(
    fake: FakePclease,
    client: AsyncPcleaseClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    large = pl.DataFrame(
        {"n": pl.int_range(calls.RESULT_IN_MEMORY_MAX_BYTES // 8 + 1000, eager=True)}
    )
    fake.answer_queries(lambda q: QueryOutcome(result=large))
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    async with client.lease("small") as lease:
        assert (await lease.remote(pl.LazyFrame({"n": [1]})).collect()).equals(large)
        assert list(spill.iterdir()) == []
        (query,) = [q for q in await client.list_queries(lease.id) if q.target == "collect"]
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
        with pytest.raises(FileNotFoundError):  # so the frame above came through a file
            await client.result_frame(query.id)
    size = await client.download_result(query.id, tmp_path / "result.arrow")
    assert size == (tmp_path / "result.arrow").stat().st_size == query.result_bytes
    with fake.client() as sync:
        assert (tmp_path / "result.arrow").read_bytes() == sync.result_bytes(query.id)


async def test_the_wait_for_a_starting_context_heartbeats(
    fake: FakePclease, client: AsyncPcleaseClient
) -> None:
    fake.starts = "hold"
    info = await client.create_lease("small")
    lease = client.hold(info)
    waiting = asyncio.create_task(lease.wait_active(60))
    await asyncio.sleep(0.05)
    assert not waiting.done() and lease.handle_state is HandleState.WAITING
    fake.start_context(info.context_id)
    await waiting
    assert lease.handle_state is HandleState.HELD
    await lease.close()
    assert fake.lease(info.id).state is LeaseState.RELEASED


async def test_a_lease_revoked_underneath_is_noticed_and_its_query_fails_with_why(
    fake: FakePclease, client: AsyncPcleaseClient
) -> None:
    fake.answer_queries(lambda q: None)  # runs until the lease ends
    async with client.lease("small") as lease:
        running = asyncio.create_task(lease.remote(pl.LazyFrame({"n": [1]})).collect())
        await asyncio.sleep(0.05)
        fake.revoke(lease.id, "revoked by ops: maintenance")
        with pytest.raises(LeaseLost) as caught:
            await running
    assert caught.value.state is LeaseState.REVOKED
    assert "maintenance" in str(caught.value)
    assert lease.handle_state is HandleState.CLOSED and lease.lost is not None
    assert fake.lease(lease.id).state is LeaseState.REVOKED  # not released over it


async def test_a_lease_is_handed_from_a_thread_to_an_event_loop_and_back(
    fake: FakePclease, client: AsyncPcleaseClient
) -> None:
    with fake.client() as sync:
        held = sync.hold(sync.create_lease("small"), labels={"t": "1"}, polars_errors=True)
        held.wait_active(10)
        held.start_heartbeats()
        ref = held.handoff()
        assert held.handle_state is HandleState.CLOSED
        assert fake.lease(held.id).state is LeaseState.ACTIVE  # handed off, not released
        # What travels is JSON with no token in it.
        wire = json.dumps(ref.to_json())
        assert fake.token not in wire
        assert LeaseRef.from_json(json.loads(wire)) == ref

        taken = await client.resume(LeaseRef.from_json(json.loads(wire)))
        assert (taken.id, dict(taken.labels), taken.polars_errors) == (held.id, {"t": "1"}, True)
        taken.start_heartbeats()
        back = await taken.handoff()
        assert fake.lease(held.id).state is LeaseState.ACTIVE
        again = sync.resume(back)
        assert again.handle_state is HandleState.HELD
        again.close()
    assert fake.lease(held.id).state is LeaseState.RELEASED


async def test_a_lease_that_ended_meanwhile_resumes_lost(
    fake: FakePclease, client: AsyncPcleaseClient
) -> None:
    info = await client.create_lease("small")
    fake.expire(info.id)
    taken = await client.resume(LeaseRef(info.id))
    assert taken.handle_state is HandleState.LOST
    with pytest.raises(LeaseLost):
        taken.check()


def test_a_lease_reference_refuses_what_is_not_one() -> None:
    with pytest.raises(ValueError, match="lease_id"):
        LeaseRef.from_json({"labels": {}})
    with pytest.raises(ValueError, match="labels"):
        LeaseRef.from_json({"lease_id": "x", "labels": ["a"]})
