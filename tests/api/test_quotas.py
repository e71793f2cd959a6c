"""Per-token quotas and budgets through the HTTP API, with a fake clock (which starts at
2026-01-01 00:00 UTC, so the day and the month start with it).

A refusal says what is used, the limit and when it frees, and leaves everything the token
holds as it was. Joining a context that runs is never refused by the limits on starting
contexts; only a request that would start one is.
"""

from __future__ import annotations

from typing import Any

import httpx

from tests.harness import Harness

TEAM = "team-a"


async def _post(
    h: Harness, headers: dict[str, str], profile: str = "small", **body: Any
) -> httpx.Response:
    return await h.client.post("/v1/leases", json={"profile": profile, **body}, headers=headers)


async def _still_held(h: Harness, headers: dict[str, str], lease_ids: list[str]) -> None:
    for lease_id in lease_ids:
        beat = await h.client.post(f"/v1/leases/{lease_id}/heartbeat", headers=headers)
        assert beat.status_code == 200, beat.text
        assert beat.json()["state"] == "active"


async def test_live_leases_over_the_quota_get_429_with_the_numbers(make_harness: Any) -> None:
    h: Harness = await make_harness(quotas={"tokens": {TEAM: {"max_live_leases": 2}}})
    team = h.token(TEAM, "lease")
    other = h.token("team-b", "lease")
    held = [(await h.lease(headers=team))["id"] for _ in range(2)]
    await h.settle()

    refused = await _post(h, team)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["quota"] == {
        "name": "live_leases",
        "profile": None,
        "used": 2,
        "limit": 2,
        "frees_at": None,
    }
    assert "team-a" in error["message"] and "max_live_leases is 2" in error["message"]
    # The first of its leases expires in its ttl of 30 s unless it heartbeats.
    assert refused.headers["Retry-After"] == "30"
    await _still_held(h, team, held)
    # Other tokens have no entry and the default has no limits.
    assert (await _post(h, other)).status_code == 201

    released = await h.client.delete(f"/v1/leases/{held[0]}", headers=team)
    assert released.status_code == 200, released.text
    again = await _post(h, team)
    assert again.status_code == 201, again.text


async def test_joining_a_running_context_is_free_starting_one_is_limited(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(
        quotas={"tokens": {TEAM: {"profiles": {"small": {"max_live_contexts": 1}}}}}
    )
    team = h.token(TEAM, "lease")
    other = h.token("team-b", "lease")
    # small: 4 leases per context, 2 contexts.
    mine = [await h.lease(headers=team) for _ in range(4)]
    assert len({lease["context_id"] for lease in mine}) == 1
    await h.settle()

    refused = await _post(h, team)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["quota"] == {
        "name": "live_contexts",
        "profile": "small",
        "used": 1,
        "limit": 1,
        "frees_at": None,
    }
    assert refused.headers["Retry-After"] == "30"
    await _still_held(h, team, [lease["id"] for lease in mine])

    # team-b starts the second context; team-a may join it: that starts nothing.
    theirs = await h.lease(headers=other)
    assert theirs["context_id"] != mine[0]["context_id"]
    joined = await _post(h, team)
    assert joined.status_code == 201, joined.text
    assert joined.json()["context_id"] == theirs["context_id"]
    await h.settle()
    assert h.backend.starts == 2


async def test_instance_hours_per_day_stop_new_starts_until_the_next_utc_day(
    make_harness: Any,
) -> None:
    h: Harness = await make_harness(
        quotas={"tokens": {TEAM: {"max_instance_hours_per_day": 1}}}, lease_ttl_max_s=7200
    )
    team = h.token(TEAM, "lease")
    lease = await h.lease(headers=team, ttl_s=7200)
    await h.settle()
    h.clock.advance(3700)  # its context has been up 1.03 h

    refused = await _post(h, team, "large")
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["code"] == "quota_exceeded"
    quota = error["quota"]
    assert quota["name"] == "instance_hours_per_day" and quota["profile"] is None
    assert quota["limit"] == 1 and 1.02 < quota["used"] < 1.03
    assert quota["frees_at"] == "2026-01-02T00:00:00+00:00"
    assert refused.headers["Retry-After"] == str(86400 - 3700)
    await _still_held(h, team, [lease["id"]])
    # Joining its running small context starts nothing: allowed.
    joined = await _post(h, team, ttl_s=7200)
    assert joined.status_code == 201, joined.text
    assert joined.json()["context_id"] == lease["context_id"]

    # The next UTC day counts from midnight: 1.03 h of yesterday no longer count.
    h.clock.advance(86400 - 3700 + 60)
    started = await _post(h, team, "large")
    assert started.status_code == 201, started.text


async def _spend_on_large(h: Harness, headers: dict[str, str], seconds: float) -> None:
    """Run a large context (hourly_cost 2.0) for ``seconds``, then let it stop."""
    lease = await h.lease("large", headers=headers, ttl_s=3600)
    await h.settle()
    h.clock.advance(seconds)
    released = await h.client.delete(f"/v1/leases/{lease['id']}", headers=headers)
    assert released.status_code == 200, released.text
    await h.tick()
    await h.tick(61)  # large's idle grace is 60 s
    await h.settle()
    assert (await h.context(lease["context_id"]))["state"] == "stopped"


async def test_a_hard_monthly_budget_refuses_new_contexts_with_403(make_harness: Any) -> None:
    h: Harness = await make_harness(
        quotas={"tokens": {TEAM: {"profiles": {"large": {"monthly_budget": 1.0}}}}}
    )
    team = h.token(TEAM, "lease")
    small = await h.lease(headers=team, ttl_s=3600)
    await _spend_on_large(h, team, 1800)  # 0.5 h at 2.0 an hour, and the grace: > 1.0

    refused = await _post(h, team, "large")
    assert refused.status_code == 403, refused.text
    assert "Retry-After" not in refused.headers
    error = refused.json()["error"]
    assert error["code"] == "budget_exhausted"
    quota = error["quota"]
    assert quota["name"] == "monthly_budget" and quota["profile"] == "large"
    assert quota["limit"] == 1.0 and quota["used"] > 1.0
    assert quota["frees_at"] == "2026-02-01T00:00:00+00:00"
    assert "team-a" in error["message"] and "2026-02-01" in error["message"]
    await _still_held(h, team, [small["id"]])
    # Other profiles have no budget.
    assert (await _post(h, team, "small")).status_code == 201


async def test_a_soft_monthly_budget_only_reports(make_harness: Any) -> None:
    h: Harness = await make_harness(
        quotas={
            "tokens": {
                TEAM: {"profiles": {"large": {"monthly_budget": 1.0, "monthly_budget_hard": False}}}
            }
        }
    )
    team = h.token(TEAM, "lease")
    await _spend_on_large(h, team, 1800)
    started = await _post(h, team, "large")
    assert started.status_code == 201, started.text


async def test_the_default_quota_applies_to_tokens_without_an_entry(make_harness: Any) -> None:
    h: Harness = await make_harness(
        quotas={"default": {"max_live_leases": 1}, "tokens": {"ops": {}}}
    )
    team = h.token(TEAM, "lease")
    ops = h.token("ops", "lease")
    await h.lease(headers=team)
    refused = await _post(h, team)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["quota"]["limit"] == 1
    # "ops" has an entry of its own, with no limits.
    for _ in range(3):
        assert (await _post(h, ops)).status_code == 201


async def test_a_replayed_request_is_answered_even_at_the_limit(make_harness: Any) -> None:
    h: Harness = await make_harness(quotas={"tokens": {TEAM: {"max_live_leases": 1}}})
    team = h.token(TEAM, "lease")
    keyed = {**team, "Idempotency-Key": "load-1"}
    first = await _post(h, keyed)
    assert first.status_code == 201, first.text
    replayed = await _post(h, keyed)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["id"] == first.json()["id"]
