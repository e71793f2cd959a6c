"""The client's picture of the API against the service's own: the same states, the same
fields, an exception class for every error code; every call the client makes, sent to the
real service (in-process, through ``httpx.AsyncClient``, as an asynchronous client would)
and read by the client's models; and the fake of ``pclease_client.testing`` answering the
same scenario with the same statuses and codes."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import Any

import httpx
import polars as pl
import pytest

import pclease_client.errors as client_errors
import pclease_client.states as client_states
import pclease_service.errors as service_errors
import pclease_service.states as service_states
from pclease_client import (
    ApiError,
    ContextInfo,
    ContextState,
    DistributedInfo,
    EventInfo,
    LeaseInfo,
    LeaseState,
    ProfileInfo,
    QueryInfo,
    QueryState,
    StopKind,
    build_submission,
    calls,
)
from pclease_client.calls import Call
from pclease_client.errors import CapacityExhausted, api_error
from pclease_client.models import Model, QueryErrorInfo
from pclease_client.testing import FAKE_URL, FakePclease, fake_profile
from pclease_service.api import schemas
from pclease_service.api.errors import _HTTP_CODES
from pclease_service.config import DistributedSettings
from tests.harness import PROFILES, Harness

# -- the same vocabulary ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["LeaseState", "ContextState", "QueryState", "StopKind"])
def test_the_client_knows_every_state_of_the_service(name: str) -> None:
    ours: type[Enum] = getattr(client_states, name)
    theirs: type[Enum] = getattr(service_states, name)
    assert {m.name: m.value for m in ours} == {m.name: m.value for m in theirs}
    for member in ours:
        if hasattr(member, "is_terminal"):
            assert member.is_terminal == theirs(member.value).is_terminal


def test_the_client_knows_every_quota_name() -> None:
    assert {m.name: m.value for m in client_errors.QuotaName} == {
        m.name: m.value for m in service_errors.QuotaName
    }


def test_the_client_knows_every_plan_refusal() -> None:
    assert {m.name: m.value for m in client_errors.PlanRefusal} == {
        m.name: m.value for m in service_errors.PlanRefusal
    }


@pytest.mark.parametrize(
    ("model", "schema"),
    [
        (LeaseInfo, schemas.LeaseOut),
        (ContextInfo, schemas.ContextOut),
        (QueryInfo, schemas.QueryOut),
        (QueryErrorInfo, schemas.QueryError),
        (DistributedInfo, DistributedSettings),
        (EventInfo, schemas.EventOut),
        (ProfileInfo, schemas.ProfileOut),
    ],
)
def test_every_model_has_the_fields_of_the_services_answer(
    model: type[Model], schema: type[Any]
) -> None:
    assert [f.name for f in dataclasses.fields(model)] == list(schema.model_fields)


def _service_errors() -> list[type[service_errors.PcleaseError]]:
    found = []
    for _, cls in inspect.getmembers(service_errors, inspect.isclass):
        if issubclass(cls, service_errors.PcleaseError) and cls is not service_errors.PcleaseError:
            found.append(cls)
    return found


@pytest.mark.parametrize("error", _service_errors(), ids=lambda cls: cls.__name__)
def test_every_error_code_of_the_service_has_its_class(
    error: type[service_errors.PcleaseError],
) -> None:
    codes = (
        [r.value for r in service_errors.PlanRefusal]
        if error is service_errors.PlanRefused
        else [error.code]
    )
    for code in codes:
        raised = api_error(error.status, code, "what to do")
        assert type(raised).__name__ == error.__name__
        assert (raised.status, raised.code, raised.message) == (error.status, code, "what to do")
        assert type(raised).status == error.status


@pytest.mark.parametrize(("status", "code"), sorted(_HTTP_CODES.items()))
def test_the_http_codes_of_the_error_handler_land_on_their_status(status: int, code: str) -> None:
    raised = api_error(status, code, "m")
    assert raised.status == status
    assert type(raised).status in (status, 0)  # 405, 406, 415: a plain ApiError


# -- the same answers ------------------------------------------------------------------------

Send = Callable[[Call[Any], str | None], Awaitable[httpx.Response]]


class Side:
    """A service the scenario runs against: how a call reaches it, and what time does."""

    def __init__(self, send: Send, settle: Callable[[], Awaitable[None]]) -> None:
        self.send = send
        self.settle = settle
        self.transcript: list[tuple[str, int, str]] = []

    async def call(self, step: str, call: Call[Any], *, token: str | None = None) -> Any:
        """Send ``call``; the answer read by the client (or the exception it raises)."""
        response = await self.send(call, token)
        code = "" if response.is_success else str(response.json()["error"]["code"])
        self.transcript.append((step, response.status_code, code))
        if response.is_success:
            return call.answer(response)
        with pytest.raises(ApiError) as caught:
            call.answer(response)
        return caught.value


async def scenario(side: Side) -> None:
    """Everything the client asks of the service, once, with typed checks both sides pass."""
    profiles = await side.call("profiles", calls.list_profiles())
    assert {p.name: p.max_contexts for p in profiles} == {"small": 2, "large": 1}

    holder = {"dag_id": "etl", "run_id": "r1", "task_id": "load", "map_index": 0}
    lease = await side.call(
        "create", calls.create_lease("small", holder=holder, ttl_s=30, idempotency_key="k-1")
    )
    assert (lease.state, dict(lease.holder)) == (LeaseState.PENDING, holder)
    replay = await side.call(
        "replay", calls.create_lease("small", holder=holder, ttl_s=30, idempotency_key="k-1")
    )
    assert replay.id == lease.id
    await side.call("key reused", calls.create_lease("large", idempotency_key="k-1"))
    await side.call("unknown profile", calls.create_lease("huge"))
    await side.call("no token", calls.list_profiles(), token="pcl_not-a-token")

    await side.settle()
    active = await side.call("get", calls.get_lease(lease.id))
    assert active.state is LeaseState.ACTIVE
    beat = await side.call("heartbeat", calls.heartbeat(lease.id))
    assert beat.expires_at >= lease.expires_at
    listed = await side.call("list leases", calls.list_leases(dag_id="etl", run_id="r1"))
    assert [x.id for x in listed] == [lease.id]
    (context,) = await side.call(
        "list contexts", calls.list_contexts(state=[ContextState.RUNNING], profile="small")
    )
    assert (context.id, context.refcount) == (lease.context_id, 1)
    assert (await side.call("context", calls.get_context(context.id))).id == context.id

    submission = build_submission(pl.LazyFrame({"a": [1, 2]}), "collect", labels={"t": "1"})
    query = await side.call("submit", calls.submit_query(lease.id, submission))
    assert (query.state, dict(query.labels)) == (QueryState.QUEUED, {"t": "1"})
    await side.settle()
    done = await side.call("query", calls.get_query(query.id, wait_s=1))
    assert done.state is QueryState.SUCCEEDED
    (listed_query,) = await side.call("lease queries", calls.list_lease_queries(lease.id))
    assert listed_query.id == query.id
    cancelled = await side.call("cancel ended", calls.cancel_query(query.id))
    assert cancelled.state is QueryState.SUCCEEDED  # harmless once it ended

    released = await side.call(
        "release holder", calls.release_holder("etl", "r1", task_id="load", map_index=0)
    )
    assert [(x.id, x.state) for x in released] == [(lease.id, LeaseState.RELEASED)]
    await side.call("heartbeat ended", calls.heartbeat(lease.id))
    await side.call("submit ended", calls.submit_query(lease.id, submission))
    again = await side.call("release again", calls.release(lease.id))
    assert again.state is LeaseState.RELEASED
    idle = await side.call("idle context", calls.get_context(context.id))
    assert idle.state is ContextState.IDLE

    await side.call("no lease", calls.get_lease("no-such-lease"))
    await side.call("no context", calls.get_context("no-such-context"))
    await side.call("no query", calls.get_query("no-such-query"))
    events = await side.call("events", calls.list_events(lease_id=lease.id))
    assert [e.to_state for e in reversed(events)][:2] == ["pending", "active"]

    # small: two contexts of four leases; the idle one takes four, a new one four more.
    held = [await side.call(f"fill {i}", calls.create_lease("small")) for i in range(8)]
    assert len({x.context_id for x in held}) == 2
    full = await side.call("full", calls.create_lease("small"))
    assert isinstance(full, CapacityExhausted) and full.retry_after_s is not None

    stopped = await side.call("stop", calls.stop_context(context.id))
    assert stopped.stop_kind is StopKind.FORCED
    assert stopped.state in (ContextState.STOPPING, ContextState.STOPPED)
    revoked = await side.call("revoked", calls.get_lease(held[0].id))
    assert revoked.state is LeaseState.REVOKED


async def test_the_real_service_answers_every_call_and_the_fake_the_same(h: Harness) -> None:
    auth = h.headers["Authorization"]

    async def to_service(call: Call[Any], token: str | None) -> httpx.Response:
        args = call.request_args()
        args["headers"] = {
            **args.get("headers", {}),
            "Authorization": f"Bearer {token}" if token else auth,
        }
        return await h.client.request(call.method, call.path, **args)

    real = Side(to_service, h.settle)
    await scenario(real)

    profiles = [fake_profile(name, **_limits(shape)) for name, shape in PROFILES.items()]
    with FakePclease(profiles) as fake:

        async def to_fake(call: Call[Any], token: str | None) -> httpx.Response:
            args = call.request_args()
            args["headers"] = {
                **args.get("headers", {}),
                "Authorization": f"Bearer {token or fake.token}",
            }
            return fake.handle(httpx.Request(call.method, FAKE_URL + call.path, **args))

        async def start_contexts() -> None:
            for context in fake.contexts():
                if context.state is ContextState.STARTING:
                    fake.start_context(context.id)

        faked = Side(to_fake, start_contexts)
        await scenario(faked)
    assert faked.transcript == real.transcript


def _limits(shape: dict[str, Any]) -> dict[str, Any]:
    keys = ("idle_grace_s", "max_leases_per_context", "max_contexts", "hourly_cost", "cpus")
    found = {key: shape[key] for key in keys if key in shape}
    found.setdefault("max_contexts", 1)
    return found


async def test_the_client_reads_the_service_s_quota_refusals(make_harness: Any) -> None:
    """The quota of a real refusal lands on the client's error, and the fake's refusal has
    the same body."""
    from pclease_client import BudgetExhausted, QuotaExceeded, QuotaName, QuotaUse

    h: Harness = await make_harness(
        quotas={
            "tokens": {
                "team-a": {
                    "max_live_leases": 1,
                    "profiles": {"large": {"monthly_budget": 0.01}},
                }
            }
        }
    )
    team = h.token("team-a", "lease")
    first = await h.client.post("/v1/leases", json={"profile": "large"}, headers=team)
    assert first.status_code == 201, first.text
    refused = await h.client.post("/v1/leases", json={"profile": "small"}, headers=team)
    assert refused.status_code == 429, refused.text
    error = calls.error_of(refused)
    assert isinstance(error, QuotaExceeded)
    assert error.quota == QuotaUse(QuotaName.LIVE_LEASES, 1, 1)
    assert error.retry_after_s == 30

    with FakePclease(["small"]) as fake:
        fake.set_quota(max_live_leases=1)
        fake.create_lease("small", {})
        faked = fake.handle(
            httpx.Request(
                "POST",
                f"{FAKE_URL}/v1/leases",
                json={"profile": "small"},
                headers={"Authorization": f"Bearer {fake.token}"},
            )
        )
        assert faked.status_code == 429
        assert faked.json()["error"]["quota"] == refused.json()["error"]["quota"]
        assert faked.headers["Retry-After"] == refused.headers["Retry-After"]

    # A spent budget: the large context ran for an hour (2.0) against a budget of 0.01.
    await h.settle()
    released = await h.client.delete(f"/v1/leases/{first.json()['id']}", headers=team)
    assert released.status_code == 200, released.text
    stopped = await h.client.post(
        f"/v1/contexts/{first.json()['context_id']}/stop", headers=h.headers
    )
    assert stopped.status_code == 200, stopped.text
    await h.tick(3600)
    await h.settle()
    spent = await h.client.post("/v1/leases", json={"profile": "large"}, headers=team)
    assert spent.status_code == 403, spent.text
    budget = calls.error_of(spent)
    assert isinstance(budget, BudgetExhausted) and budget.quota is not None
    assert budget.quota.name is QuotaName.MONTHLY_BUDGET and budget.quota.profile == "large"
    assert budget.quota.frees_at is not None and budget.quota.frees_at.month == 2
