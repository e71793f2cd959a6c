"""/metrics after a scripted sequence of leases, on a fake clock so every value is exact."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pclease_service.api.app import create_app
from pclease_service.config import LogFormat
from pclease_service.ledger import InstanceLedger
from pclease_service.logs import JsonFormatter, RequestLog
from tests.harness import Harness

HOLDER = {"dag_id": "etl", "run_id": "r1", "task_id": "load"}


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_a_scripted_sequence(h: Harness) -> None:
    before = await scrape(h.client)
    a = await h.lease("small", holder={**HOLDER, "task_id": "a"})
    b = await h.lease("small", holder={**HOLDER, "task_id": "b"})
    big = await h.lease("large", holder=HOLDER, ttl_s=300)
    await h.settle()

    during = await scrape(h.client)
    assert value(during, "pclease_contexts", profile="small", state="running") == 1
    assert value(during, "pclease_contexts", profile="large", state="running") == 1
    assert value(during, "pclease_leases", profile="small", state="active") == 2
    assert value(during, "pclease_leases", profile="large", state="active") == 1
    assert value(during, "pclease_context_starts_total", profile="small") == 1
    created = value(during, "pclease_lease_request_seconds_count", outcome="created")
    assert created - value(before, "pclease_lease_request_seconds_count", outcome="created") == 3

    await h.tick(10)  # both contexts run for 10 s
    for lease in (a, b):
        await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    await h.tick(30)  # small: idle for its whole grace of 30 s, then stopped
    await h.settle()
    stopped = await h.client.post(f"/v1/contexts/{big['context_id']}/stop", headers=h.headers)
    assert stopped.status_code == 200
    await h.settle()

    after = await scrape(h.client)
    for profile in ("small", "large"):
        for state in ("starting", "running", "idle", "stopping"):
            assert value(after, "pclease_contexts", profile=profile, state=state) == 0
    assert value(after, "pclease_context_stops_total", profile="small", reason="idle") == 1
    assert value(after, "pclease_context_stops_total", profile="large", reason="forced") == 1
    assert value(after, "pclease_lease_ends_total", profile="small", state="released") == 2
    assert value(after, "pclease_lease_ends_total", profile="large", state="revoked") == 1
    assert value(after, "pclease_leases", profile="small", state="active") == 0

    seconds = "pclease_instance_seconds_total"
    assert value(after, seconds, profile="small", state="running") == pytest.approx(10)
    assert value(after, seconds, profile="small", state="idle") == pytest.approx(30)
    assert value(after, seconds, profile="large", state="running") == pytest.approx(40)
    assert value(after, seconds, profile="large", state="idle") == 0
    # small: 40 s at $0.5/h; large: 40 s at $2/h
    assert value(after, "pclease_cost_total", profile="small") == pytest.approx(40 * 0.5 / 3600)
    assert value(after, "pclease_cost_total", profile="large") == pytest.approx(40 * 2.0 / 3600)

    # A restarted service rebuilds the same numbers from the events table.
    restarted = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(h.service)), base_url="http://pclease.test"
    )
    again = await scrape(restarted)
    await restarted.aclose()
    for key in (
        ("small", "running"),
        ("small", "idle"),
        ("large", "running"),
    ):
        profile, state = key
        assert value(again, seconds, profile=profile, state=state) == value(
            after, seconds, profile=profile, state=state
        )


async def test_open_stretches_count_up_to_now(h: Harness) -> None:
    await h.lease("small", holder=HOLDER)
    await h.settle()
    await h.tick(25)
    first = await scrape(h.client)
    assert value(first, "pclease_instance_seconds_total", profile="small", state="running") == 25
    await h.tick(5)
    second = await scrape(h.client)
    assert value(second, "pclease_instance_seconds_total", profile="small", state="running") == 30


async def test_backend_errors_and_refused_leases_are_counted(make_harness: Any) -> None:
    h = await make_harness(lease_wait_default_s=0)
    before = await scrape(h.client)
    h.backend.fail_start = True
    await h.lease("large", holder=HOLDER)
    await h.settle()
    full = await h.client.post(
        "/v1/leases", json={"profile": "nope", "holder": HOLDER}, headers=h.headers
    )
    assert full.status_code == 422
    after = await scrape(h.client)
    errors = "pclease_backend_errors_total"
    assert value(after, errors, operation="start") - value(before, errors, operation="start") == 1
    assert value(after, "pclease_context_stops_total", profile="large", reason="failed") == 1
    refused = "pclease_lease_request_seconds_count"
    assert (
        value(after, refused, outcome="unknown_profile")
        - value(before, refused, outcome="unknown_profile")
        == 1
    )
    calls = "pclease_backend_call_seconds_count"
    assert value(after, calls, operation="start") > value(before, calls, operation="start")


def test_ledger_waits_for_ids_committed_out_of_order() -> None:
    from datetime import UTC, datetime, timedelta

    from pclease_service.store.reads import LedgerEvent

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    ledger = InstanceLedger()

    def event(i: int, state: str, seconds: float, ctx: str = "c1") -> LedgerEvent:
        return LedgerEvent(i, t0 + timedelta(seconds=seconds), ctx, state, "small", 3600.0)

    ledger._apply(event(1, "starting", 0))
    ledger._apply(event(2, "running", 0))
    # id 3 belongs to a transaction still open; id 4 commits first
    ledger._apply(event(4, "starting", 5, "c2"))
    assert 3 in ledger._gaps
    ledger._apply(event(3, "idle", 10))
    assert not ledger._gaps
    ledger._apply(event(3, "idle", 10))  # seen twice: applied once
    seconds = ledger.seconds(t0 + timedelta(seconds=20))
    assert seconds[("small", "running")] == 10
    assert seconds[("small", "idle")] == 10
    assert seconds[("small", "starting")] == 15
    assert ledger.cost(t0 + timedelta(seconds=20))["small"] == pytest.approx(35)


# -- structured logs ---------------------------------------------------------------------------


def test_json_log_lines_carry_ids() -> None:
    formatter = JsonFormatter()
    context_id = "3f2a8e44-1c2b-4d5e-8f90-123456789abc"
    record = logging.LogRecord(
        "pclease.reconciler",
        logging.INFO,
        __file__,
        1,
        "context %s failed: %s",
        (context_id, "boom"),
        None,
    )
    line = json.loads(formatter.format(record))
    assert line["message"] == f"context {context_id} failed: boom"
    assert line["context_id"] == context_id
    assert line["level"] == "info"
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "took %d%% of %s", (50, context_id), None
    )
    assert "context_id" not in json.loads(formatter.format(record))


async def test_request_log_names_the_lease_it_created(h: Harness) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    access = logging.getLogger("pclease.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    settings = h.service.settings.model_copy(update={"log_format": LogFormat.JSON})
    h.service.settings = settings
    app = create_app(h.service)
    assert any(m.cls is RequestLog for m in app.user_middleware)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
    try:
        created = await client.post(
            "/v1/leases", json={"profile": "small", "holder": HOLDER}, headers=h.headers
        )
        lease = created.json()
        await client.post(f"/v1/leases/{lease['id']}/heartbeat", headers=h.headers)
    finally:
        await client.aclose()
        access.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["path"] == "/v1/leases"
    assert lines[0]["status"] == 201
    assert lines[0]["lease_id"] == lease["id"]
    assert lines[0]["context_id"] == lease["context_id"]
    assert lines[1]["lease_id"] == lease["id"]
    assert "duration_ms" in lines[1]
    assert h.headers["Authorization"] not in stream.getvalue()


async def test_usage_per_token_with_its_limits(make_harness: Any) -> None:
    h: Harness = await make_harness(
        quotas={
            "default": {"max_live_leases": 10},
            "tokens": {
                "team-a": {
                    "max_live_leases": 3,
                    "max_instance_hours_per_day": 8,
                    "profiles": {"large": {"max_live_contexts": 1, "monthly_budget": 100}},
                },
                "idle-team": {},
            },
        }
    )
    team = h.token("team-a", "lease")
    other = h.token("team-b", "lease")
    first = await h.lease("large", headers=team, ttl_s=3600)
    await h.lease("large", headers=team, ttl_s=3600)  # joins: starts nothing
    await h.lease("small", headers=other, ttl_s=3600)
    await h.settle()
    await h.tick(1800)

    samples = await scrape(h.client)
    assert value(samples, "pclease_token_live_leases", token="team-a") == 2
    assert value(samples, "pclease_token_live_leases", token="team-b") == 1
    assert value(samples, "pclease_token_live_contexts", token="team-a", profile="large") == 1
    assert value(samples, "pclease_token_live_contexts", token="team-b", profile="small") == 1
    assert value(samples, "pclease_token_instance_hours_today", token="team-a") == 0.5
    # large costs 2.0 an hour, small 0.5.
    assert value(samples, "pclease_token_cost_this_month", token="team-a", profile="large") == 1.0
    assert value(samples, "pclease_token_cost_this_month", token="team-b", profile="small") == 0.25
    limits = {
        (labels["token"], labels["quota"], labels["profile"]): v
        for (name, label_items), v in samples.items()
        if name == "pclease_token_quota_limit"
        for labels in [dict(label_items)]
    }
    assert limits == {
        ("team-a", "live_leases", ""): 3,
        ("team-a", "instance_hours_per_day", ""): 8,
        ("team-a", "live_contexts", "large"): 1,
        ("team-a", "monthly_budget", "large"): 100,
        ("team-b", "live_leases", ""): 10,  # the default
    }
    # Labels carry names only: no token id or secret.
    response = await h.client.get("/metrics")
    assert response.status_code == 200
    assert team["Authorization"].split()[1] not in response.text
    assert first["id"] not in response.text
