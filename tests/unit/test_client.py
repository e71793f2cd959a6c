"""The client against the fake service of ``pclease_client.testing``: typed answers, the
error tree, retries, the lease's life (waiting, heartbeats, its end noticed), queries and
the watchdog. The same client against the real service: tests/api/test_client_contract.py
and tests/live/."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import polars as pl
import pytest
from polars.exceptions import ColumnNotFoundError

from pclease_client import (
    ApiError,
    CapacityExhausted,
    ContextState,
    LeaseInfo,
    LeaseLost,
    LeaseState,
    PcleaseClient,
    QueryFailed,
    QueryInfo,
    QueryState,
    RequestFailed,
    StopKind,
    build_submission,
    calls,
)
from pclease_client.errors import (
    DatabaseBusy,
    IdempotencyConflict,
    LeaseClosed,
    LeaseEnded,
    LeaseNotFound,
    NotFound,
    ServiceUnavailable,
    Unauthorized,
    UnexpectedResponse,
    UnknownProfile,
    api_error,
)
from pclease_client.lease import HANDLE_TRANSITIONS, HandleState
from pclease_client.testing import FAKE_URL, FakePclease, QueryOutcome, SubmittedQuery, fake_profile

SMALL = pl.DataFrame({"n": [1, 4, 9]})
HOLDER = {"dag_id": "etl", "run_id": "r1", "task_id": "load", "map_index": -1}


@pytest.fixture
def fake() -> Iterator[FakePclease]:
    with FakePclease(["small", fake_profile("tiny", max_leases_per_context=1)]) as fake:
        yield fake


@pytest.fixture
def client(fake: FakePclease) -> Iterator[PcleaseClient]:
    with fake.client() as client:
        yield client


def frame() -> pl.LazyFrame:
    return pl.LazyFrame({"n": [1, 2, 3]})


# -- typed answers and errors ----------------------------------------------------------------


def test_answers_are_typed(fake: FakePclease, client: PcleaseClient) -> None:
    assert [p.name for p in client.list_profiles()] == ["small", "tiny"]
    lease = client.create_lease("small", holder=HOLDER, ttl_s=30)
    assert isinstance(lease, LeaseInfo)
    assert lease.state is LeaseState.PENDING  # a new context is starting
    assert isinstance(lease.created_at, datetime) and lease.created_at.tzinfo is not None
    assert dict(lease.holder) == HOLDER
    assert lease.heartbeat_interval_s == 10.0
    active = client.get_lease(lease.id, wait_s=5, while_state=LeaseState.PENDING)
    assert active.state is LeaseState.ACTIVE
    (context,) = client.list_contexts(state=[ContextState.RUNNING])
    assert (context.id, context.refcount) == (lease.context_id, 1)
    assert client.get_context(context.id) == context
    assert [x.id for x in client.list_leases(dag_id="etl", run_id="r1")] == [lease.id]
    assert client.list_leases(state=[LeaseState.RELEASED]) == []
    released = client.release(lease.id)
    assert released.state is LeaseState.RELEASED
    assert client.release(lease.id) == released  # repeating it answers the same lease
    assert client.get_context(context.id).state is ContextState.IDLE
    stopped = client.stop_context(context.id)
    assert (stopped.state, stopped.stop_kind) == (ContextState.STOPPED, StopKind.FORCED)
    events = client.list_events(lease_id=lease.id)
    assert [(e.from_state, e.to_state) for e in reversed(events)] == [
        (None, "pending"),
        ("pending", "active"),
        ("active", "released"),
    ]


def test_error_answers_become_the_class_of_their_code(client: PcleaseClient) -> None:
    with pytest.raises(UnknownProfile) as unknown:
        client.create_lease("huge")
    assert (unknown.value.status, unknown.value.code) == (422, "unknown_profile")
    assert "configured profiles are: small, tiny" in unknown.value.message
    with pytest.raises(LeaseNotFound) as missing:
        client.get_lease("no-such-lease")
    assert isinstance(missing.value, NotFound)
    assert missing.value.status == 404
    lease = client.create_lease("small")
    client.release(lease.id)
    with pytest.raises(LeaseEnded, match="has ended: it is released"):
        client.heartbeat(lease.id)


def test_unknown_codes_fall_back_on_their_status() -> None:
    assert type(api_error(404, "route_gone", "m")) is NotFound
    assert type(api_error(503, "maintenance", "m")) is ServiceUnavailable
    assert type(api_error(418, "teapot", "m")) is ApiError
    assert type(api_error(503, "database_busy", "m")) is DatabaseBusy
    busy = api_error(429, "capacity_exhausted", "full", {"retry-after": "7"})
    assert isinstance(busy, CapacityExhausted) and busy.retry_after_s == 7.0


def test_a_wrong_token_is_unauthorized_without_echoing_it(fake: FakePclease) -> None:
    secret = "pcl_" + "s" * 30
    with (
        PcleaseClient(FAKE_URL, secret, transport=fake.transport()) as client,
        pytest.raises(Unauthorized) as caught,
    ):
        client.list_profiles()
    assert caught.value.status == 401
    assert secret not in str(caught.value)


def test_an_answer_not_in_the_apis_shape_is_unexpected() -> None:
    def proxy(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/profiles":
            return httpx.Response(200, text="<html>a login page</html>")
        return httpx.Response(200, json={"leases": [{"id": "x", "state": "zombie"}]})

    with PcleaseClient(FAKE_URL, "t", transport=httpx.MockTransport(proxy)) as client:
        with pytest.raises(UnexpectedResponse) as html:
            client.list_profiles()
        assert html.value.status == 200
        with pytest.raises(UnexpectedResponse, match="no field 'profile'"):
            client.list_leases()


def test_a_bad_field_is_named() -> None:
    lease = {"id": "l", "state": "zombie"}
    with pytest.raises(ValueError, match=r"lease: no field 'profile'"):
        LeaseInfo.from_json(lease)
    good = LeaseInfo.from_json(_lease_json())
    assert LeaseInfo.from_json(good.to_json()) == good
    with pytest.raises(ValueError, match=r"lease\.state: 'zombie' is not one of pending, active"):
        LeaseInfo.from_json({**_lease_json(), "state": "zombie"})
    with pytest.raises(ValueError, match=r"lease\.ttl_s: expected a number, got a string"):
        LeaseInfo.from_json({**_lease_json(), "ttl_s": "60"})
    assert LeaseInfo.from_json({**_lease_json(), "added_later": 1}) == good  # ignored


def _lease_json() -> dict[str, object]:
    return {
        "id": "l-1",
        "profile": "small",
        "context_id": "c-1",
        "state": "active",
        "ttl_s": 60,
        "expires_at": "2026-11-23T10:01:00Z",
        "heartbeat_interval_s": 20.0,
        "holder": {"dag_id": "etl", "map_index": -1, "urgent": True},
        "created_at": "2026-11-23T10:00:00Z",
        "activated_at": "2026-11-23T10:00:01+00:00",
        "heartbeat_at": None,
        "ended_at": None,
        "end_reason": None,
    }


# -- retries -----------------------------------------------------------------------------


def test_transient_errors_are_retried(fake: FakePclease, client: PcleaseClient) -> None:
    fake.fail_requests(2, status=503, code="database_busy")
    assert client.list_profiles()
    assert fake.requests.count("GET /v1/profiles") == 3
    fake.fail_requests(9, status=503, code="backend_unavailable")
    with pytest.raises(ServiceUnavailable) as caught:
        client.list_profiles()
    assert caught.value.code == "backend_unavailable"
    assert fake.requests.count("GET /v1/profiles") == 3 + 5  # once and four retries


def test_a_lease_request_retried_after_a_lost_answer_leases_once(fake: FakePclease) -> None:
    lost = {"answers": 1}

    def flaky(request: httpx.Request) -> httpx.Response:
        response = fake.handle(request)
        if request.method == "POST" and lost["answers"]:
            lost["answers"] -= 1
            raise httpx.ReadError("connection reset", request=request)
        return response

    with PcleaseClient(FAKE_URL, fake.token, transport=httpx.MockTransport(flaky)) as client:
        lease = client.create_lease("small", holder=HOLDER)
    assert [x.id for x in fake.leases()] == [lease.id]  # the replay answered the first
    with fake.client() as client:
        again = client.send(calls.create_lease("small", holder=HOLDER, idempotency_key="k-1"))
        assert client.create_lease("small", holder=HOLDER, idempotency_key="k-1") == again
        with pytest.raises(IdempotencyConflict):
            client.create_lease("tiny", idempotency_key="k-1")


def test_a_submission_is_not_repeated_once_sent(fake: FakePclease) -> None:
    def drops_submissions(request: httpx.Request) -> httpx.Response:
        response = fake.handle(request)
        if request.url.path.endswith("/queries"):
            raise httpx.ReadError("connection reset", request=request)
        return response

    with PcleaseClient(
        FAKE_URL, fake.token, transport=httpx.MockTransport(drops_submissions), backoff_s=0
    ) as client:
        lease = client.create_lease("small")
        with pytest.raises(RequestFailed) as caught:
            client.submit(lease.id, build_submission(frame(), "collect"))
    assert isinstance(caught.value.__cause__, httpx.ReadError)
    assert len(fake.queries()) == 1  # sent once: a retry could have run it twice


def test_no_answer_at_all_is_request_failed() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with (
        PcleaseClient(FAKE_URL, "t", transport=httpx.MockTransport(refused), backoff_s=0) as c,
        pytest.raises(RequestFailed, match="no answer from pclease") as caught,
    ):
        c.list_profiles()
    assert isinstance(caught.value.__cause__, httpx.ConnectError)


# -- a lease's life ----------------------------------------------------------------------


def test_a_lease_runs_queries_and_is_released(fake: FakePclease, client: PcleaseClient) -> None:
    result = pl.DataFrame({"n": [1, 4, 9]})
    fake.answer_queries(
        lambda q: QueryOutcome(result=result) if q.target == "collect" else QueryOutcome(rows=3)
    )
    with client.lease("small", holder=HOLDER, labels={"team": "data"}, watchdog=False) as lease:
        assert lease.state is LeaseState.ACTIVE
        assert lease.remote(frame()).collect().equals(result)
        written = lease.remote(frame(), labels={"step": "2"}).sink_parquet("/lake/out.parquet")
        assert (written.state, written.rows, written.output) == (
            QueryState.SUCCEEDED,
            3,
            "/lake/out.parquet",
        )
    assert fake.lease(lease.id).state is LeaseState.RELEASED
    first, second = fake.queries(lease_id=lease.id)
    assert (first.target, dict(first.labels)) == ("collect", {"team": "data"})
    assert dict(second.labels) == {"team": "data", "step": "2"}
    # Lineage: the fake reads nothing unless told; a sink's output is its destination.
    assert (first.inputs, first.outputs) == ((), ())
    assert (second.inputs, second.outputs) == ((), ("/lake/out.parquet",))

    sent = fake.submitted(second.id)
    assert sent.options["destination"] == "/lake/out.parquet"
    assert sent.plan and len(sent.plan) == second.plan_bytes


#: Just over the size a result is read in memory: its IPC body goes through a file.
LARGE = pl.DataFrame({"n": pl.int_range(calls.RESULT_IN_MEMORY_MAX_BYTES // 8 + 1000, eager=True)})


def _collected(client: PcleaseClient, lease_id: str) -> QueryInfo:
    query = client.submit(lease_id, build_submission(frame(), "collect"))
    return client.wait_query(query.id)


def test_a_large_result_is_read_through_a_temporary_file_and_a_small_one_in_memory(
    fake: FakePclease,
    client: PcleaseClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake.answer_queries(lambda q: QueryOutcome(result=LARGE if "large" in q.labels else SMALL))
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    with client.lease("small", watchdog=False) as lease:
        assert lease.remote(frame(), labels={"large": "1"}).collect().equals(LARGE)
        assert list(spill.iterdir()) == []  # the temporary file is gone again
        # Without a directory for temporary files, only the large result fails.
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
        assert lease.remote(frame()).collect().equals(SMALL)
        with pytest.raises(FileNotFoundError):
            lease.remote(frame(), labels={"large": "1"}).collect()


def test_a_result_downloads_to_a_file(
    fake: FakePclease, client: PcleaseClient, tmp_path: Path
) -> None:
    fake.answer_queries(lambda q: QueryOutcome(result=LARGE))
    with client.lease("small", watchdog=False) as lease:
        query = _collected(client, lease.id)
    size = client.download_result(query.id, tmp_path / "result.arrow")
    assert size == (tmp_path / "result.arrow").stat().st_size == query.result_bytes
    assert pl.read_ipc(tmp_path / "result.arrow").equals(LARGE)
    with pytest.raises(NotFound):
        client.download_result("no-such-query", tmp_path / "other.arrow")


def test_a_result_transfer_that_breaks_is_sent_again_from_the_start(tmp_path: Path) -> None:
    body = bytes(range(256)) * 4096
    attempts = []

    class Breaks(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield body[:1000]
            raise httpx.ReadError("connection reset")

    def answer(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        headers = {"Content-Length": str(len(body))}
        if len(attempts) == 1:
            return httpx.Response(200, headers=headers, stream=Breaks())
        return httpx.Response(200, headers=headers, content=body)

    transport = httpx.MockTransport(answer)
    with PcleaseClient(FAKE_URL, "t", transport=transport, backoff_s=0) as client:
        assert client.download_result("q1", tmp_path / "r.arrow") == len(body)
    assert (tmp_path / "r.arrow").read_bytes() == body
    assert attempts == ["/v1/queries/q1/result"] * 2


def test_a_failed_query_raises_query_failed_or_polars_own_error(
    fake: FakePclease, client: PcleaseClient
) -> None:
    fake.fail_queries("ColumnNotFoundError", 'unable to find column "x"')
    with client.lease("small", watchdog=False) as lease:
        with pytest.raises(QueryFailed) as caught:
            lease.remote(frame()).collect()
        assert (caught.value.error_type, caught.value.state) == (
            "ColumnNotFoundError",
            QueryState.FAILED,
        )
        lease.polars_errors = True
        with pytest.raises(ColumnNotFoundError, match="unable to find column"):
            lease.remote(frame()).collect()


def test_the_fake_reports_the_inputs_it_is_told(fake: FakePclease, client: PcleaseClient) -> None:
    fake.report_inputs(lambda q: [f"/lake/in/{q.labels['step']}.csv"])
    with client.lease("small", watchdog=False) as lease:
        written = lease.remote(frame(), labels={"step": "a"}).sink_csv("/lake/out/a.csv")
    assert (written.inputs, written.outputs) == (("/lake/in/a.csv",), ("/lake/out/a.csv",))
    assert QueryInfo.from_json(written.to_json()) == written


def test_capacity_exhausted(fake: FakePclease, client: PcleaseClient) -> None:
    client.create_lease("tiny")
    with pytest.raises(CapacityExhausted) as caught:
        client.create_lease("tiny")
    assert caught.value.retry_after_s == 5
    assert "at capacity" in caught.value.message


def test_a_context_that_fails_to_start_ends_the_lease(
    fake: FakePclease, client: PcleaseClient
) -> None:
    fake.starts = "fail"
    with pytest.raises(LeaseLost) as caught, client.lease("small", watchdog=False):
        pass
    assert caught.value.state is LeaseState.FAILED
    assert fake.contexts()[0].stop_kind is StopKind.FAILED


def test_a_context_that_does_not_start_in_time_releases_the_lease(
    fake: FakePclease, client: PcleaseClient
) -> None:
    fake.starts = "hold"
    with (
        pytest.raises(LeaseLost, match="context not running after 0 s"),
        client.lease("small", start_timeout_s=0, watchdog=False),
    ):
        pass
    (lease,) = fake.leases()
    assert lease.state is LeaseState.RELEASED


def test_a_lease_revoked_underneath_is_noticed_by_its_watch(
    fake: FakePclease, client: PcleaseClient
) -> None:
    with client.lease("small", watchdog=False) as lease:
        fake.revoke(lease.id, "an operator needed the machine")
        assert lease._thread is not None
        lease._thread.join(30)  # the watch returns at once and its thread ends
        assert not lease._thread.is_alive()
        with pytest.raises(LeaseLost, match="revoked") as caught:
            lease.remote(frame())
    assert caught.value.reason == "an operator needed the machine"


def test_a_lease_ended_mid_query_cancels_it_and_says_why(
    fake: FakePclease, client: PcleaseClient
) -> None:
    running = threading.Event()

    def keeps_running(query: SubmittedQuery) -> None:
        running.set()
        return None

    fake.answer_queries(keeps_running)
    failures: list[BaseException] = []
    with client.lease("small", watchdog=False) as lease:

        def run() -> None:
            try:
                lease.remote(frame()).collect()
            except BaseException as exc:
                failures.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        assert running.wait(30)
        fake.expire(lease.id)
        worker.join(30)
    (error,) = failures
    assert isinstance(error, LeaseLost)
    assert error.state is LeaseState.EXPIRED
    (query,) = fake.queries()
    assert query.state is QueryState.CANCELLED


def test_release_holder_releases_a_task_instance_or_a_run(
    fake: FakePclease, client: PcleaseClient
) -> None:
    mine = [client.create_lease("small", holder={**HOLDER, "map_index": i}) for i in (0, 1)]
    other = client.create_lease("small", holder={**HOLDER, "run_id": "r2"})
    released = client.release_holder("etl", "r1", task_id="load", map_index=1)
    assert [x.id for x in released] == [mine[1].id]
    assert [x.id for x in client.release_holder("etl", "r1")] == [mine[0].id]
    assert fake.lease(other.id).state is LeaseState.PENDING
    assert "DELETE /v1/leases?dag_id=etl&run_id=r1&task_id=load&map_index=1" in fake.requests
    with pytest.raises(ValueError, match="give its task_id too"):
        client.release_holder("etl", "r1", map_index=1)


def test_release_once_uses_a_connection_of_its_own(
    fake: FakePclease, client: PcleaseClient
) -> None:
    lease = client.create_lease("small")
    assert client.release_once(lease.id).state is LeaseState.RELEASED


def test_the_watchdog_releases_the_lease_when_its_holder_is_gone(fake: FakePclease) -> None:
    with fake.serve() as url, PcleaseClient(url, fake.token) as client:
        lease = client.create_lease("small", holder=HOLDER)
        watchdog = client.watchdog_for(lease.id, give_up_after_s=30)
        assert watchdog is not None
        # What the kernel does when the holder dies: the pipe closes without "done".
        process = watchdog._process
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(30) == 0
        assert fake.lease(lease.id).state is LeaseState.RELEASED
        assert f"DELETE /v1/leases/{lease.id}" in fake.requests


def test_a_release_that_fails_is_tried_again_on_a_connection_of_its_own(
    fake: FakePclease, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake.serve() as url, PcleaseClient(url, fake.token) as client:
        monkeypatch.setattr(client, "release", broken_release)
        with client.lease("small", holder=HOLDER, watchdog=False) as lease:
            pass
        assert fake.lease(lease.id).state is LeaseState.RELEASED
        assert lease.state is LeaseState.RELEASED


def test_a_lease_nobody_could_release_is_left_to_its_watchdog(
    fake: FakePclease, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake.serve() as url, PcleaseClient(url, fake.token) as client:
        monkeypatch.setattr(client, "release", broken_release)
        monkeypatch.setattr(client, "release_once", broken_release)
        with client.lease("small", holder=HOLDER) as lease:
            watchdog = lease._watchdog
        assert watchdog is not None
        assert fake.lease(lease.id).state is LeaseState.ACTIVE
        # Still armed: when this process dies (its pipe closes without "done"), it releases.
        process = watchdog._process
        assert process.stdin is not None
        process.stdin.close()
        assert process.wait(30) == 0
        assert fake.lease(lease.id).state is LeaseState.RELEASED


def broken_release(lease_id: str, **_: object) -> LeaseInfo:
    raise RequestFailed("DELETE", f"/v1/leases/{lease_id}", "the connection broke")


# -- the handle's own life -------------------------------------------------------------------


def test_a_closed_handle_says_so_and_releases_once(
    fake: FakePclease, client: PcleaseClient
) -> None:
    with client.lease("small", watchdog=False) as lease:
        assert lease.handle_state is HandleState.HELD
        with pytest.raises(RuntimeError, match="cannot start heartbeats: its handle is held"):
            lease.start_heartbeats()  # beating already
    assert lease.handle_state is HandleState.CLOSED
    lease.close()  # idempotent: no second release
    assert fake.requests.count(f"DELETE /v1/leases/{lease.id}") == 1
    with pytest.raises(LeaseClosed) as caught:
        lease.remote(frame())
    assert str(caught.value) == (
        f"lease {lease.id} was let go by this process (released by its holder): cannot run "
        "more work on it; take a new lease for more work"
    )
    with pytest.raises(LeaseClosed, match="cannot heartbeat"):
        lease.start_heartbeats()


def test_a_lost_handle_raises_how_it_was_lost_and_does_not_release(
    fake: FakePclease, client: PcleaseClient
) -> None:
    info = client.create_lease("small")
    lease = client.hold(info)
    fake.revoke(lease.id, "the machine was needed")
    with pytest.raises(LeaseLost, match="revoked"):
        lease.wait_active(30)
    assert lease.handle_state is HandleState.LOST
    with pytest.raises(LeaseLost, match="the machine was needed"):
        lease.remote(frame())
    lease.close()
    assert lease.handle_state is HandleState.CLOSED
    assert f"DELETE /v1/leases/{lease.id}" not in fake.requests  # it had ended


def test_an_attached_lease_starts_where_the_lease_is(
    fake: FakePclease, client: PcleaseClient
) -> None:
    pending = client.create_lease("small")
    assert client.attach(pending.id).handle_state is HandleState.WAITING
    client.release(pending.id)
    ended = client.attach(pending.id)
    assert ended.handle_state is HandleState.LOST
    with pytest.raises(LeaseLost, match="released"):
        ended.remote(frame())
    ended.close()
    assert fake.requests.count(f"DELETE /v1/leases/{pending.id}") == 1  # only our own


def test_the_handle_transitions_end_in_closed() -> None:
    assert HANDLE_TRANSITIONS[HandleState.CLOSED] == frozenset()
    for state, targets in HANDLE_TRANSITIONS.items():
        if state is not HandleState.CLOSED:
            assert HandleState.CLOSED in targets


def test_quota_errors_carry_the_quota(fake: FakePclease, client: PcleaseClient) -> None:
    from datetime import UTC, datetime

    from pclease_client import BudgetExhausted, QuotaExceeded, QuotaName, QuotaUse
    from pclease_client.errors import Forbidden

    fake.set_quota(max_live_leases=2, max_live_contexts={"tiny": 1})
    held = client.create_lease("tiny")
    # tiny takes one lease per context, and the token may have started one of them.
    with pytest.raises(QuotaExceeded) as caught:
        client.create_lease("tiny")
    assert (caught.value.status, caught.value.code) == (429, "quota_exceeded")
    assert caught.value.retry_after_s == 30
    assert caught.value.quota == QuotaUse(QuotaName.LIVE_CONTEXTS, 1, 1, "tiny")
    client.create_lease("small")
    with pytest.raises(QuotaExceeded) as caught:
        client.create_lease("small")  # would join, but the token holds 2 leases
    assert caught.value.quota == QuotaUse(QuotaName.LIVE_LEASES, 2, 2)
    assert not fake.lease(held.id).state.is_terminal  # untouched

    client.release(held.id)
    fake.stop_context(held.context_id)  # the next lease on tiny must start one
    month = datetime(2027, 1, 1, tzinfo=UTC)
    fake.exhaust(QuotaName.MONTHLY_BUDGET, used=101.5, limit=100, profile="tiny", frees_at=month)
    with pytest.raises(BudgetExhausted) as spent:
        client.create_lease("tiny")
    assert isinstance(spent.value, Forbidden) and spent.value.code == "budget_exhausted"
    assert spent.value.quota == QuotaUse(QuotaName.MONTHLY_BUDGET, 101.5, 100, "tiny", month)
    with pytest.raises(ValueError, match="set_quota"):
        fake.exhaust(QuotaName.LIVE_LEASES, used=1, limit=1)
    fake.restore()
    assert client.create_lease("tiny").state in (LeaseState.PENDING, LeaseState.ACTIVE)


def test_a_quota_body_the_client_cannot_read_still_raises_by_code() -> None:
    from pclease_client import QuotaExceeded

    odd = api_error(429, "quota_exceeded", "over", {"retry-after": "9"}, {"quota": {"x": 1}})
    assert isinstance(odd, QuotaExceeded) and odd.quota is None and odd.retry_after_s == 9
