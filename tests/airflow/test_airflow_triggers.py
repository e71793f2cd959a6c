"""Deferrable pclease tasks against the fake service: the trigger's serialization, what it
does in a triggerer (holds the lease while a context boots or a query runs, notices the
lease's end, gives up at the deadline, leaves the lease alone when the triggerer goes,
cancels and releases when the user kills the task), the operators' deferrals and
resumptions, ``default_deferrable``, and the lineage the provider reports. Fast; the same
under a real scheduler and triggerer is in test_airflow_deferrable.py."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import closing
from typing import Any

import polars as pl
import pytest
from polars.exceptions import ColumnNotFoundError

from airflow_plugin import deferring, lineage
from airflow_plugin.deferring import default_deferrable
from airflow_plugin.hooks import PcleaseLeaseLostError
from airflow_plugin.operators import PcleaseAcquireLeaseOperator, PcleaseOperator
from airflow_plugin.triggers import PcleaseLeaseTrigger
from pclease_client import LeaseRef, LeaseState, QueryState
from pclease_client.testing import QueryOutcome
from tests.airflow import test_airflow_provider as provider_tests
from tests.airflow.test_airflow_provider import LABELS, Pclease, squares

# The fake service on a loopback port, reached through a real connection; a task context.
pclease = provider_tests.pclease
context = provider_tests.context

TaskDeferred: Any
from airflow.providers.common.compat.sdk import TaskDeferred  # noqa: E402


async def first_event(trigger: PcleaseLeaseTrigger) -> dict[str, Any]:
    async for event in trigger.run():
        return dict(event.payload)
    raise AssertionError("the trigger ended without an event")


def revived(trigger: PcleaseLeaseTrigger) -> PcleaseLeaseTrigger:
    """The trigger as a triggerer rebuilds it from what Airflow stored."""
    classpath, kwargs = trigger.serialize()
    assert classpath == "airflow_plugin.triggers.PcleaseLeaseTrigger"
    stored = json.loads(json.dumps(kwargs))
    return PcleaseLeaseTrigger(**stored)


def deferral(caught: pytest.ExceptionInfo[Any]) -> tuple[PcleaseLeaseTrigger, str]:
    deferred = caught.value
    assert isinstance(deferred.trigger, PcleaseLeaseTrigger)
    return revived(deferred.trigger), str(deferred.method_name)


@pytest.fixture(autouse=True)
def fire_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Deferred tasks' triggers may fire at once here (no scheduler to race with)."""
    monkeypatch.setattr(deferring, "SETTLE_S", 0.0)


# -- the trigger -------------------------------------------------------------------------


def test_the_trigger_serializes_the_lease_reference_never_the_token(pclease: Pclease) -> None:
    ref = LeaseRef("lease-1", {"airflow.task_id": "load"}, polars_errors=True)
    trigger = PcleaseLeaseTrigger(
        lease=ref.to_json(), pclease_conn_id="pclease_x", query_id="q-1", deadline_at=12.5
    )
    classpath, kwargs = trigger.serialize()
    assert kwargs == {
        "lease": {
            "lease_id": "lease-1",
            "labels": {"airflow.task_id": "load"},
            "polars_errors": True,
        },
        "pclease_conn_id": "pclease_x",
        "query_id": "q-1",
        "deadline_at": 12.5,
        "not_before": None,
    }
    assert pclease.fake.token not in json.dumps(kwargs)
    assert revived(trigger).serialize() == (classpath, kwargs)
    with pytest.raises(ValueError, match="lease_id"):
        PcleaseLeaseTrigger(lease={})


async def test_the_trigger_holds_a_lease_while_its_context_boots(pclease: Pclease) -> None:
    fake = pclease.fake
    fake.starts = "hold"
    with fake.client() as client:
        info = client.create_lease("small", ttl_s=1.5)  # a beat every half second
    trigger = PcleaseLeaseTrigger(lease=LeaseRef(info.id).to_json(), deadline_at=time.time() + 60)
    waiting = asyncio.create_task(first_event(revived(trigger)))
    beat = f"POST /v1/leases/{info.id}/heartbeat"
    # A pending lease is kept alive while its context boots.
    await _until(lambda: fake.requests.count(beat) >= 2, "two heartbeats")
    assert not waiting.done()
    fake.start_context(info.context_id)
    event = await asyncio.wait_for(waiting, 10)
    assert event == {"status": "running", "lease": LeaseRef(info.id).to_json()}
    assert fake.lease(info.id).state is LeaseState.ACTIVE  # handed back, not released


async def test_the_trigger_heartbeats_while_a_query_runs_and_wakes_when_it_ends(
    pclease: Pclease,
) -> None:
    fake = pclease.fake
    fake.answer_queries(lambda q: None)
    with fake.client() as client:
        info = client.create_lease("small", ttl_s=3)  # a beat a second
        client.get_lease(info.id, wait_s=1)  # the fake starts the context on a wait
        query = client.submit(info.id, _submission())
    trigger = PcleaseLeaseTrigger(lease=LeaseRef(info.id).to_json(), query_id=query.id)
    waiting = asyncio.create_task(first_event(revived(trigger)))
    beat = f"POST /v1/leases/{info.id}/heartbeat"
    await _until(lambda: fake.requests.count(beat) >= 2, "two heartbeats")
    assert not waiting.done()
    fake.finish_query(query.id, QueryOutcome(rows=7))
    event = await asyncio.wait_for(waiting, 10)
    assert event["status"] == "done"
    assert (event["query"]["state"], event["query"]["rows"]) == ("succeeded", 7)
    assert fake.lease(info.id).state is LeaseState.ACTIVE


async def test_a_lease_revoked_while_deferred_wakes_the_task_with_the_reason(
    pclease: Pclease,
) -> None:
    fake = pclease.fake
    fake.answer_queries(lambda q: None)
    with fake.client() as client:
        info = client.create_lease("small")
        client.get_lease(info.id, wait_s=1)
        query = client.submit(info.id, _submission())
    trigger = PcleaseLeaseTrigger(lease=LeaseRef(info.id).to_json(), query_id=query.id)
    waiting = asyncio.create_task(first_event(trigger))
    await asyncio.sleep(0.2)
    fake.revoke(info.id, "ops needed the context")
    event = await asyncio.wait_for(waiting, 10)
    assert event == {
        "status": "lost",
        "lease_id": info.id,
        "state": "revoked",
        "reason": "ops needed the context",
    }
    assert fake.query(query.id).state is QueryState.CANCELLED


async def test_the_trigger_fires_no_earlier_than_it_was_told(pclease: Pclease) -> None:
    """A deferred task resumed before Airflow saw its process end would be failed by the
    scheduler: the operators tell the trigger when it may fire (deferring.SETTLE_S)."""
    fake = pclease.fake
    with fake.client() as client:
        info = client.create_lease("small", ttl_s=1.5)
    not_before = time.time() + 1.0
    trigger = PcleaseLeaseTrigger(lease=LeaseRef(info.id).to_json(), not_before=not_before)
    event = await asyncio.wait_for(first_event(trigger), 30)
    assert event["status"] == "running"
    assert time.time() >= not_before
    beat = f"POST /v1/leases/{info.id}/heartbeat"
    assert fake.requests.count(beat) >= 1  # held while it waited
    assert fake.lease(info.id).state is LeaseState.ACTIVE


async def test_a_context_not_running_by_the_deadline_releases_the_lease(pclease: Pclease) -> None:
    fake = pclease.fake
    fake.starts = "hold"
    with fake.client() as client:
        info = client.create_lease("small")
    trigger = PcleaseLeaseTrigger(lease=LeaseRef(info.id).to_json(), deadline_at=time.time() + 0.3)
    assert await asyncio.wait_for(first_event(trigger), 30) == {
        "status": "timeout",
        "lease_id": info.id,
    }
    assert fake.lease(info.id).state is LeaseState.RELEASED


async def test_a_triggerer_that_stops_leaves_the_lease_and_the_query_alone(
    pclease: Pclease,
) -> None:
    fake = pclease.fake
    fake.answer_queries(lambda q: None)
    with fake.client() as client:
        info = client.create_lease("small")
        client.get_lease(info.id, wait_s=1)
        query = client.submit(info.id, _submission())
    trigger = PcleaseLeaseTrigger(lease=LeaseRef(info.id).to_json(), query_id=query.id)
    running = asyncio.create_task(first_event(trigger))
    await asyncio.sleep(0.2)
    running.cancel()  # what a triggerer that shuts down does to its triggers
    with pytest.raises(asyncio.CancelledError):
        await running
    assert fake.lease(info.id).state is LeaseState.ACTIVE
    assert fake.query(query.id).state is QueryState.RUNNING
    # Another triggerer picks it up where this one left it.
    again = asyncio.create_task(first_event(revived(trigger)))
    await asyncio.sleep(0.2)
    fake.finish_query(query.id, QueryOutcome(rows=1))
    assert (await asyncio.wait_for(again, 10))["status"] == "done"


async def test_killing_the_deferred_task_cancels_its_query_and_releases_its_lease(
    pclease: Pclease,
) -> None:
    fake = pclease.fake
    fake.answer_queries(lambda q: None)
    with fake.client() as client:
        info = client.create_lease("small")
        client.get_lease(info.id, wait_s=1)
        query = client.submit(info.id, _submission())
    trigger = PcleaseLeaseTrigger(lease=LeaseRef(info.id).to_json(), query_id=query.id)
    running = asyncio.create_task(first_event(trigger))
    await asyncio.sleep(0.2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await trigger.on_kill()
    assert fake.query(query.id).state is QueryState.CANCELLED
    assert fake.lease(info.id).state is LeaseState.RELEASED


# -- the operators -------------------------------------------------------------------------


async def test_a_deferrable_operator_defers_while_the_context_boots_and_the_query_runs(
    pclease: Pclease, context: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = pclease.fake
    fake.starts = "hold"
    fake.answer_queries(lambda q: None)
    fake.report_inputs(lambda q: ["/lake/raw/n.csv"])
    collected = Collector()
    monkeypatch.setattr(lineage, "_collector", lambda: collected)
    op = PcleaseOperator(
        task_id="load",
        profile="small",
        build=squares,
        op_args=[3],
        target="/lake/out/sq.parquet",
        deferrable=True,
        ttl_s=30,
    )
    with pytest.raises(TaskDeferred) as caught:
        await asyncio.to_thread(op.execute, context)
    trigger, method = deferral(caught)
    assert method == "execute_running"
    (lease,) = fake.leases()
    assert lease.state is LeaseState.PENDING
    assert dict(lease.holder)["task_id"] == "load"
    assert context["ti"].xcom["pclease_lease_id"] == lease.id

    waiting = asyncio.create_task(first_event(trigger))
    await asyncio.sleep(0.2)
    fake.start_context(lease.context_id)
    event = await asyncio.wait_for(waiting, 10)

    with pytest.raises(TaskDeferred) as caught:
        await asyncio.to_thread(getattr(op, method), context, event)
    trigger, method = deferral(caught)
    assert method == "execute_complete"
    (query,) = fake.queries()
    assert (query.state, dict(query.labels)) == (QueryState.RUNNING, LABELS)
    assert trigger.query_id == query.id

    waiting = asyncio.create_task(first_event(trigger))
    await asyncio.sleep(0.2)
    fake.finish_query(query.id, QueryOutcome(rows=3))
    event = await asyncio.wait_for(waiting, 10)
    answer = await asyncio.to_thread(getattr(op, method), context, event)
    assert answer == {
        "lease_id": lease.id,
        "query_id": query.id,
        "rows": 3,
        "target": "/lake/out/sq.parquet",
    }
    assert fake.lease(lease.id).state is LeaseState.RELEASED
    # Lineage: to the hook-level collector, and as OpenLineage facets.
    assert collected.seen == [
        ("input", "file:///lake/raw/n.csv"),
        ("output", "file:///lake/out/sq.parquet"),
    ]
    assert collected.reporters == {"PcleaseHook"}
    facets = op.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in facets.inputs] == [("file", "/lake/raw/n.csv")]
    assert [(d.namespace, d.name) for d in facets.outputs] == [("file", "/lake/out/sq.parquet")]


def test_a_short_query_on_a_running_context_is_not_deferred_for(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    pclease.fake.answer_queries(lambda q: QueryOutcome(result=pl.DataFrame({"sq": [0, 1]})))
    warm = warm_context(pclease)
    op = PcleaseOperator(
        task_id="load", profile="small", build=squares, op_args=[2], sink="collect", deferrable=True
    )
    answer = op.execute(context)
    assert (answer["rows"], answer["schema"]) == (2, {"sq": "Int64"})
    assert answer["lease_id"] != warm
    assert pclease.fake.lease(answer["lease_id"]).state is LeaseState.RELEASED


def test_a_failed_query_fails_the_resumed_task_with_polars_own_error(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    pclease.fake.fail_queries("ColumnNotFoundError", 'unable to find column "x"')
    warm = warm_context(pclease)
    op = PcleaseOperator(
        task_id="load", profile="small", build=squares, op_args=[2], sink="collect", deferrable=True
    )
    with pytest.raises(ColumnNotFoundError, match='"x"'):
        op.execute(context)
    (lease,) = [x for x in pclease.fake.leases() if x.id != warm]
    assert lease.state is LeaseState.RELEASED


def test_a_lost_event_fails_the_resumed_task_with_the_reason(context: dict[str, Any]) -> None:
    op = PcleaseOperator(
        task_id="load", profile="small", build=squares, sink="collect", deferrable=True
    )
    lost = {"status": "lost", "lease_id": "l-1", "state": "revoked", "reason": "ops needed it"}
    with pytest.raises(
        PcleaseLeaseLostError,
        match=r"pclease lease l-1 ended underneath this task \(revoked: ops needed it\)",
    ):
        op.execute_complete(context, lost)
    timeout = {"status": "timeout", "lease_id": "l-1"}
    with pytest.raises(PcleaseLeaseLostError, match="context not running after 900 s"):
        op.execute_running(context, timeout)


async def test_a_deferrable_setup_task_waits_for_its_context_in_the_triggerer(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    fake = pclease.fake
    fake.starts = "hold"
    op = PcleaseAcquireLeaseOperator(task_id="warm", profile="small", deferrable=True)
    with pytest.raises(TaskDeferred) as caught:
        await asyncio.to_thread(op.execute, context)
    trigger, method = deferral(caught)
    (lease,) = fake.leases()
    assert dict(lease.holder)["purpose"] == "warm"
    waiting = asyncio.create_task(first_event(trigger))
    await asyncio.sleep(0.2)
    fake.start_context(lease.context_id)
    assert await asyncio.to_thread(getattr(op, method), context, await waiting) == lease.id
    assert fake.lease(lease.id).state is LeaseState.ACTIVE  # warm for the tasks after it


def test_default_deferrable_follows_airflow_then_the_pclease_section(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", raising=False)
    monkeypatch.delenv("AIRFLOW__PCLEASE__DEFAULT_DEFERRABLE", raising=False)
    assert default_deferrable() is False
    assert (
        PcleaseOperator(task_id="a", profile="s", build=squares, sink="collect").deferrable is False
    )
    monkeypatch.setenv("AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE", "True")
    assert default_deferrable() is True
    assert PcleaseAcquireLeaseOperator(task_id="b", profile="s").deferrable is True
    monkeypatch.setenv("AIRFLOW__PCLEASE__DEFAULT_DEFERRABLE", "False")
    assert default_deferrable() is False
    op = PcleaseOperator(task_id="c", profile="s", build=squares, sink="collect", deferrable=True)
    assert op.deferrable is True  # the task's own choice wins


def test_the_hook_and_the_non_deferrable_operator_report_lineage_too(
    pclease: Pclease, context: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An intermediate (written, then read back) is an output only in the facets."""
    collected = Collector()
    monkeypatch.setattr(lineage, "_collector", lambda: collected)
    pclease.fake.report_inputs(
        lambda q: ["s3://lake/raw/a.csv"] if q.target == "parquet" else ["s3://lake/mid.parquet"]
    )
    op = PcleaseOperator(
        task_id="load",
        profile="small",
        build=squares,
        op_args=[2],
        target="s3://lake/mid.parquet",
        deferrable=False,
    )
    op.execute(context)
    with closing(pclease.hook()) as hook, hook.lease("small", context=context) as lease:
        lease.remote(squares(1)).sink_csv("s3://lake/out.csv")
    assert collected.seen == [
        ("input", "s3://lake/raw/a.csv"),
        ("output", "s3://lake/mid.parquet"),
        ("input", "s3://lake/mid.parquet"),
        ("output", "s3://lake/out.csv"),
    ]
    facets = op.get_openlineage_facets_on_complete(None)
    assert [(d.namespace, d.name) for d in facets.inputs] == [("s3://lake", "raw/a.csv")]
    assert [(d.namespace, d.name) for d in facets.outputs] == [("s3://lake", "mid.parquet")]
    both = lineage.inputs_outputs(
        [q for q in pclease.fake.queries() if q.state is QueryState.SUCCEEDED]
    )
    assert both == (["s3://lake/raw/a.csv"], ["s3://lake/mid.parquet", "s3://lake/out.csv"])


def test_lineage_names_local_files_and_object_store_uris() -> None:
    assert lineage.asset_uri("/lake/a.parquet") == "file:///lake/a.parquet"
    assert lineage.asset_uri("s3://bucket/k/a.parquet") == "s3://bucket/k/a.parquet"
    assert lineage.dataset_name("/lake/a.parquet") == ("file", "/lake/a.parquet")
    assert lineage.dataset_name("s3://bucket/k/a.parquet") == ("s3://bucket", "k/a.parquet")


# -- helpers -------------------------------------------------------------------------------


def warm_context(service: Pclease) -> str:
    """A running context on "small" (held by a lease of its own): new leases are active at
    once. Returns that lease's id."""
    with service.fake.client() as client:
        warm = client.create_lease("small")
        client.get_lease(warm.id, wait_s=1)  # the fake starts a context on a wait
    return warm.id


class Collector:
    """What Airflow's hook-level lineage collector is told."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.reporters: set[str] = set()

    def add_input_asset(self, *, context: Any, uri: str) -> None:
        self.seen.append(("input", uri))
        self.reporters.add(type(context).__name__)

    def add_output_asset(self, *, context: Any, uri: str) -> None:
        self.seen.append(("output", uri))
        self.reporters.add(type(context).__name__)


def _submission() -> Any:
    from pclease_client import build_submission

    return build_submission(squares(2), "collect")


async def _until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)
