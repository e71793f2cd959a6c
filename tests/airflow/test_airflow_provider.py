"""The provider's logic against the fake service of ``pclease_client.testing``, served on a
loopback port and reached through a real ``pclease`` Airflow connection: the hook's lease
lifecycle and lease-lost handling, the operators' and ``@task.pclease``'s arguments and
results, ``on_kill``, and the listener's release. Fast (no service, no Airflow
deployment); the same paths against the real service and a real scheduler are in
test_airflow_hook.py and test_airflow_deployment.py."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.exceptions import ColumnNotFoundError

# Airflow reads its home when first imported; keep it out of the user's.
os.environ.setdefault("AIRFLOW_HOME", str(Path(__file__).parent / ".airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from airflow.sdk import DAG

from airflow_plugin.decorators import pclease_task
from airflow_plugin.hooks import PcleaseHook, PcleaseLeaseLostError
from airflow_plugin.links import LEASE_XCOM_KEY
from airflow_plugin.operators import (
    PcleaseAcquireLeaseOperator,
    PcleaseOperator,
    PcleaseReleaseLeaseOperator,
)
from airflow_plugin.releases import ReleaseRequest, release
from pclease_client import CapacityExhausted, ContextState, LeaseLost, LeaseState, QueryState
from pclease_client.errors import LeaseClosed
from pclease_client.testing import FakePclease, QueryOutcome, SubmittedQuery, fake_profile

HOLDER = {"dag_id": "etl", "run_id": "r1", "task_id": "load", "try_number": 2, "map_index": -1}
LABELS = {f"airflow.{key}": str(value) for key, value in HOLDER.items()}


class TaskInstance:
    """What the provider reads off a running task instance, and the XComs it pushes."""

    def __init__(self) -> None:
        for key, value in HOLDER.items():
            setattr(self, key, value)
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


class Pclease:
    def __init__(self, fake: FakePclease, url: str) -> None:
        self.fake, self.url = fake, url

    def connection(self, token: str | None = None, port: int | None = None) -> Any:
        from airflow.sdk import Connection

        return Connection(
            conn_id="pclease_test",
            conn_type="pclease",
            host="127.0.0.1",
            port=port or int(self.url.rsplit(":", 1)[1]),
            password=self.fake.token if token is None else token,
        )

    def hook(self, **kwargs: Any) -> PcleaseHook:
        return PcleaseHook("pclease_test", connection=self.connection(**kwargs))


@pytest.fixture
def pclease(monkeypatch: pytest.MonkeyPatch) -> Iterator[Pclease]:
    profiles = ["small", fake_profile("tiny", max_leases_per_context=1)]
    with FakePclease(profiles) as fake, fake.serve() as url:
        # What the operators resolve: the default connection, here from the environment.
        port = int(url.rsplit(":", 1)[1])
        address = {"conn_type": "pclease", "host": "127.0.0.1", "port": port}
        monkeypatch.setenv(
            "AIRFLOW_CONN_PCLEASE_DEFAULT", json.dumps({**address, "password": fake.token})
        )
        yield Pclease(fake, url)


@pytest.fixture
def context() -> dict[str, Any]:
    return {"ti": TaskInstance()}


def squares(n: int) -> pl.LazyFrame:
    return pl.LazyFrame({"n": list(range(int(n)))}).with_columns(sq=pl.col("n") ** 2)


def free_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


# -- the hook ------------------------------------------------------------------------------


def test_the_hook_leases_for_the_task_labels_its_queries_and_releases(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    fake = pclease.fake
    fake.answer_queries(lambda q: QueryOutcome(result=pl.DataFrame({"sq": [0, 1, 4]})))
    hook = pclease.hook()
    with hook.lease("small", context=context) as lease:
        held = fake.lease(lease.id)
        assert (held.state, dict(held.holder)) == (LeaseState.ACTIVE, HOLDER)
        assert lease.url == f"{pclease.url}/ui/leases/{lease.id}"
        assert (lease.profile, lease.context_id) == ("small", held.context_id)
        assert lease.remote(squares(3), labels={"step": "1"}).collect()["sq"].to_list() == [
            0,
            1,
            4,
        ]
    hook.close()
    assert fake.lease(lease.id).state is LeaseState.RELEASED
    (query,) = fake.queries()
    assert dict(query.labels) == {**LABELS, "step": "1"}


def test_a_failed_query_raises_polars_own_error(pclease: Pclease) -> None:
    pclease.fake.fail_queries("ColumnNotFoundError", 'unable to find column "missing"')
    hook = pclease.hook()
    with (
        pytest.raises(ColumnNotFoundError, match="missing"),
        hook.lease("small", context={}) as lease,
    ):
        lease.remote(squares(3).select("missing")).collect()
    hook.close()
    assert pclease.fake.lease(lease.id).state is LeaseState.RELEASED


@pytest.mark.parametrize(
    ("end", "state"),
    [("revoke", "revoked: an operator needed it"), ("expire", "expired: no heartbeat for 60 s")],
)
def test_a_lease_lost_underneath_fails_the_task_clearly(
    pclease: Pclease, end: str, state: str
) -> None:
    hook = pclease.hook()
    leases = []

    def work_after_the_end() -> None:
        with hook.lease("small", context={}) as lease:
            leases.append(lease)
            if end == "revoke":
                pclease.fake.revoke(lease.id, "an operator needed it")
            else:
                pclease.fake.expire(lease.id)
            lease.remote(squares(1)).collect()

    with pytest.raises(PcleaseLeaseLostError) as caught:
        work_after_the_end()
    (lease,) = leases
    hook.close()
    message = str(caught.value)
    assert f"pclease lease {lease.id} ended underneath this task ({state})" in message
    assert "no more work was submitted" in message
    assert isinstance(caught.value, LeaseLost)
    assert pclease.fake.queries() == []


def test_a_lease_lost_mid_query_cancels_it_and_fails_the_task(pclease: Pclease) -> None:
    fake = pclease.fake

    def revoked_while_running(query: SubmittedQuery) -> None:
        fake.revoke(query.lease_id, "its context was needed elsewhere")
        return None

    fake.answer_queries(revoked_while_running)
    hook = pclease.hook()
    with (
        pytest.raises(PcleaseLeaseLostError, match=r"\(revoked: its context was needed"),
        hook.lease("small", context={}) as lease,
    ):
        lease.remote(squares(1)).collect()
    hook.close()
    (query,) = fake.queries()
    assert query.state is QueryState.CANCELLED


def test_a_context_that_cannot_start_fails_the_task(pclease: Pclease) -> None:
    pclease.fake.starts = "fail"
    hook = pclease.hook()
    with (
        pytest.raises(PcleaseLeaseLostError, match=r"ended underneath this task \(failed"),
        hook.lease("small", context={}),
    ):
        raise AssertionError("the body never runs")
    hook.close()


class Interrupted(BaseException):
    """What ``execution_timeout`` raises from its SIGALRM handler: AirflowTaskTimeout."""


def test_a_lease_request_interrupted_after_it_reached_the_service_is_released(
    pclease: Pclease, context: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = pclease.fake
    hook = pclease.hook()
    client = hook.get_conn()
    create = client.create_lease

    def interrupted_on_the_way_back(*args: Any, **kwargs: Any) -> Any:
        create(*args, **kwargs)  # the service made the lease; its id never arrives
        raise Interrupted

    monkeypatch.setattr(client, "create_lease", interrupted_on_the_way_back)
    with pytest.raises(Interrupted), hook.lease("small", context=context):
        raise AssertionError("the body never runs")
    hook.close()
    (lease,) = fake.leases()
    assert lease.state is LeaseState.RELEASED
    assert dict(lease.holder) == HOLDER
    assert any(request.startswith("DELETE /v1/leases?") for request in fake.requests)


def test_a_refused_lease_request_releases_nothing_else(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    fake = pclease.fake
    hook = pclease.hook()
    with hook.lease("tiny", context=context) as held:
        # The service answered: no lease was made, so the one the task holds stays.
        with pytest.raises(CapacityExhausted), hook.lease("tiny", context=context):
            raise AssertionError("the body never runs")
        assert fake.lease(held.id).state is LeaseState.ACTIVE
    hook.close()
    assert not any(request.startswith("DELETE /v1/leases?") for request in fake.requests)


def test_a_profile_at_capacity_fails_the_lease_request_clearly(pclease: Pclease) -> None:
    hook = pclease.hook()
    hook.get_conn().create_lease("tiny")
    with pytest.raises(CapacityExhausted, match="at capacity") as caught, hook.lease("tiny"):
        raise AssertionError("the body never runs")
    hook.close()
    assert caught.value.status == 429
    assert "wait_s" in caught.value.message


def test_test_connection(pclease: Pclease) -> None:
    with closing(pclease.hook()) as hook:
        ok, message = hook.test_connection()
    assert ok, message
    assert message.endswith("profiles: small, tiny")
    secret = "pcl_" + "x" * 30
    with closing(pclease.hook(token=secret)) as hook:
        ok, message = hook.test_connection()
    assert not ok
    assert "401 unauthorized" in message
    assert secret not in message
    with closing(
        PcleaseHook("pclease_test", connection=pclease.connection(port=free_port()), retries=0)
    ) as hook:
        ok, message = hook.test_connection()
    assert not ok
    assert "no answer from pclease" in message


# -- the listener's release ------------------------------------------------------------------


def test_the_listener_releases_a_task_instance_then_its_run(pclease: Pclease) -> None:
    fake = pclease.fake
    client = pclease.hook().get_conn()
    mine = [client.create_lease("small", holder={**HOLDER, "map_index": i}) for i in (0, 1)]
    other = client.create_lease("small", holder={**HOLDER, "run_id": "r2"})
    client.close()
    connection = pclease.connection()
    one = ReleaseRequest("pclease_test", "etl", "r1", "load", 1, "failed", connection)
    assert release(one) == [mine[1].id]
    assert "DELETE /v1/leases?dag_id=etl&run_id=r1&task_id=load&map_index=1" in fake.requests
    assert release(ReleaseRequest("pclease_test", "etl", "r1", connection=connection)) == [
        mine[0].id
    ]
    assert fake.lease(other.id).state is LeaseState.PENDING


def test_the_listener_logs_a_release_that_got_no_answer(
    pclease: Pclease, caplog: pytest.LogCaptureFixture
) -> None:
    request = ReleaseRequest(
        "pclease_test",
        "etl",
        "r1",
        why="the run ended",
        connection=pclease.connection(port=free_port()),
    )
    assert release(request) == []
    assert "could not release the leases of etl/r1 (the run ended)" in caplog.text


# -- operators -----------------------------------------------------------------------------


def test_the_operator_sinks_and_reports_its_query(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    fake = pclease.fake
    fake.answer_queries(lambda q: QueryOutcome(rows=7))
    operator = PcleaseOperator(
        task_id="squares",
        profile="small",
        build=squares,
        op_kwargs={"n": 7},
        sink="csv",
        target="s3://lake/squares.csv",
        storage_options={"aws_region": "eu-west-1"},
    )
    result = operator.execute(context)
    (query,) = fake.queries()
    (lease,) = fake.leases()
    assert result == {
        "lease_id": lease.id,
        "query_id": query.id,
        "rows": 7,
        "target": "s3://lake/squares.csv",
    }
    sent = fake.submitted(query.id)
    assert (sent.target, sent.options["destination"]) == ("csv", "s3://lake/squares.csv")
    assert dict(sent.labels) == LABELS
    assert "storage_options" not in sent.options  # they travel inside the plan
    assert b"eu-west-1" in sent.plan
    assert lease.state is LeaseState.RELEASED
    assert context["ti"].xcom[LEASE_XCOM_KEY] == lease.id
    assert f"{pclease.url}/ui/leases/{lease.id}" in context["ti"].xcom.values()


def test_the_operator_collects_into_rows_and_schema(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    pclease.fake.answer_queries(lambda q: QueryOutcome(result=squares(4).collect()))
    operator = PcleaseOperator(
        task_id="t", profile="small", build=squares, op_args=[4], sink="collect"
    )
    result = operator.execute(context)
    assert result == {
        "lease_id": result["lease_id"],
        "rows": 4,
        "schema": {"n": "Int64", "sq": "Int64"},
    }


def test_an_operator_whose_build_returns_no_lazyframe_fails_and_releases(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    operator = PcleaseOperator(
        task_id="t", profile="small", build=lambda: pl.DataFrame({"a": [1]}), sink="collect"
    )
    with pytest.raises(TypeError, match="build returned DataFrame; it must return a polars"):
        operator.execute(context)
    (lease,) = pclease.fake.leases()
    assert lease.state is LeaseState.RELEASED
    assert pclease.fake.queries() == []


def test_on_kill_releases_a_lease_still_waiting_for_its_context(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    fake = pclease.fake
    fake.starts = "hold"
    operator = PcleaseOperator(task_id="t", profile="small", build=squares, sink="collect")
    failures: list[BaseException] = []

    def run() -> None:
        try:
            operator.execute(context)
        except BaseException as exc:
            failures.append(exc)

    task = threading.Thread(target=run)
    task.start()
    # Once it waits for the context, the task holds its lease for on_kill.
    wait_until(lambda: any("state=pending" in r for r in fake.requests), "the task to wait")
    operator.on_kill()  # what the SIGTERM handler calls
    task.join(30)
    assert not task.is_alive()
    (lease,) = fake.leases()
    assert lease.state is LeaseState.RELEASED
    (error,) = failures
    assert isinstance(error, LeaseClosed)
    assert f"lease {lease.id} was let go by this process (its task was killed)" in str(error)
    assert fake.queries() == []


@pytest.mark.parametrize("wait_for_context", [True, False])
def test_the_setup_operator_keeps_a_warm_lease(
    pclease: Pclease, context: dict[str, Any], wait_for_context: bool
) -> None:
    fake = pclease.fake
    setup = PcleaseAcquireLeaseOperator(
        task_id="warm", profile="small", ttl_s=900, wait_for_context=wait_for_context
    )
    lease_id = setup.execute(context)
    lease = fake.lease(lease_id)
    assert dict(lease.holder) == {**HOLDER, "purpose": "warm"}
    assert lease.ttl_s == 900
    # Not released when the setup ends: the teardown or the listener does that.
    assert lease.state is (LeaseState.ACTIVE if wait_for_context else LeaseState.PENDING)
    assert fake.context(lease.context_id).state is (
        ContextState.RUNNING if wait_for_context else ContextState.STARTING
    )
    assert context["ti"].xcom[LEASE_XCOM_KEY] == lease_id

    teardown = PcleaseReleaseLeaseOperator(task_id="warm_release", lease_id=lease_id)
    teardown.execute(context)
    assert fake.lease(lease_id).state is LeaseState.RELEASED


def test_a_setup_whose_context_cannot_start_fails_there(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    pclease.fake.starts = "fail"
    setup = PcleaseAcquireLeaseOperator(task_id="warm", profile="small")
    with pytest.raises(LeaseLost, match="failed"):
        setup.execute(context)
    (lease,) = pclease.fake.leases()
    assert lease.state is LeaseState.FAILED


def test_a_teardown_without_a_lease_calls_nobody(pclease: Pclease) -> None:
    PcleaseReleaseLeaseOperator(task_id="t", lease_id="").execute({})
    assert pclease.fake.requests == []


# -- @task.pclease ---------------------------------------------------------------------------


def test_the_decorated_function_gets_its_lease_first(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    fake = pclease.fake
    fake.answer_queries(lambda q: QueryOutcome(result=squares(5).collect()))
    seen: list[Any] = []

    with DAG("decorated", schedule=None):

        @pclease_task(profile="small", ttl_s=45)
        def count(lease: Any, n: int, *, offset: int = 0) -> int:
            seen.append((lease.id, lease.profile, n, offset))
            return int(lease.remote(squares(n)).collect().height) + offset

        out = count(5, offset=1)

    result = out.operator.execute(context)
    assert result == 6
    (lease,) = fake.leases()
    assert seen == [(lease.id, "small", 5, 1)]
    assert (lease.ttl_s, lease.state) == (45, LeaseState.RELEASED)
    assert dict(fake.queries()[0].labels) == LABELS


def test_a_decorated_function_that_raises_releases_its_lease(
    pclease: Pclease, context: dict[str, Any]
) -> None:
    with DAG("raises", schedule=None):

        @pclease_task(profile="small")
        def explode(lease: Any) -> None:
            raise ValueError("the task broke while holding its lease")

        out = explode()

    with pytest.raises(ValueError, match="broke while holding"):
        out.operator.execute(context)
    (lease,) = pclease.fake.leases()
    assert lease.state is LeaseState.RELEASED
