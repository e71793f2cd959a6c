"""The dashboard in process: sign-in, pages, admin actions, bad input, secrets, scale."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from pclease_service import principals, store
from pclease_service.backends.memory import MemoryBackend
from pclease_service.config import Settings
from pclease_service.dashboard import charts
from pclease_service.dashboard.sessions import SESSION_COOKIE, SessionSigner, safe_next
from pclease_service.db.tx import Tx
from pclease_service.errors import BackendError
from pclease_service.ledger import Interval
from pclease_service.states import ContextState, LeaseState
from tests.harness import PROFILES, Harness

CLOUD_SECRET = "pc-client-secret-0f9e8d7c6b5a"
HOLDER = {"dag_id": "etl", "run_id": "manual__2026-01-01", "task_id": "load"}


def new_token(h: Harness, name: str, *scopes: str) -> str:
    header = h.token(name, *scopes)
    return header["Authorization"].removeprefix("Bearer ")


def browser(h: Harness) -> httpx.AsyncClient:
    """A second client on the same app, with its own cookie jar."""
    return httpx.AsyncClient(transport=h.client._transport, base_url="http://pclease.test")


def form_csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


async def sign_in(client: httpx.AsyncClient, token: str, next_path: str = "/ui/") -> httpx.Response:
    form = await client.get("/ui/login", params={"next": next_path})
    assert form.status_code == 200
    return await client.post(
        "/ui/login", data={"token": token, "csrf": form_csrf(form.text), "next": next_path}
    )


async def signed_in(h: Harness, *scopes: str, name: str | None = None) -> httpx.AsyncClient:
    client = browser(h)
    response = await sign_in(client, new_token(h, name or "-".join(scopes), *scopes))
    assert response.status_code == 303, response.text
    return client


def assert_page(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text[:3000]
    assert response.headers["content-type"].startswith("text/html")
    assert "Traceback" not in response.text
    for word in words:
        assert word in response.text, f"{word!r} not on the page"


# -- sign-in -----------------------------------------------------------------------------------


async def test_sign_in_sets_a_session_cookie_without_the_token(h: Harness) -> None:
    client = browser(h)
    token = new_token(h, "viewer", "read")
    response = await sign_in(client, token, "/ui/events")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/events"
    cookie = next(c for c in response.headers.get_list("set-cookie") if SESSION_COOKIE in c)
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie or "samesite=lax" in cookie.lower()
    assert "Path=/ui" in cookie
    assert token not in cookie
    assert principals.hash_token(token) not in cookie
    assert_page(await client.get("/ui/"), 200, "Instances up", "viewer")
    await client.aclose()


async def test_pages_need_a_session(h: Harness) -> None:
    client = browser(h)
    response = await client.get("/ui/contexts/abc?page=2")
    assert response.status_code == 303
    assert response.headers["location"] == "/ui/login?next=%2Fui%2Fcontexts%2Fabc%3Fpage%3D2"
    probe = await client.get("/ui/api/version")
    assert probe.status_code == 401
    assert probe.json()["error"]["code"] == "unauthorized"
    fragment = await client.get("/ui/", headers={"X-Pclease-Fragment": "1"})
    assert fragment.status_code == 401
    client.cookies.set(SESSION_COOKIE, "eyJ0IjoiYSJ9.AAAA")
    forged = await client.get("/ui/")
    assert forged.status_code == 303
    assert (await client.get("/")).headers["location"] == "/ui/"
    await client.aclose()


@pytest.mark.parametrize(
    ("token", "csrf", "status", "words"),
    [
        ("pcl_unknown", True, 401, ("unknown or revoked",)),
        ("", True, 422, ("Paste a pclease token",)),
        ("whatever", False, 400, ("expired",)),
        ("x" * 501, True, 422, ("token",)),
    ],
)
async def test_sign_in_refusals(
    h: Harness, token: str, csrf: bool, status: int, words: tuple[str, ...]
) -> None:
    client = browser(h)
    form = await client.get("/ui/login")
    data = {"token": token, "csrf": form_csrf(form.text) if csrf else "forged"}
    response = await client.post("/ui/login", data=data)
    assert_page(response, status, *words)
    assert SESSION_COOKIE not in response.headers.get("set-cookie", "")
    await client.aclose()


async def test_lease_only_token_cannot_sign_in(h: Harness) -> None:
    client = browser(h)
    response = await sign_in(client, new_token(h, "airflow", "lease"))
    assert_page(response, 403, "read or admin")
    await client.aclose()


async def test_next_is_kept_on_this_dashboard() -> None:
    assert safe_next("/ui/leases/x?a=1") == "/ui/leases/x?a=1"
    for bad in ("https://evil.example/", "//evil.example/ui/", "/v1/leases", "/ui/\\evil", None):
        assert safe_next(bad) == "/ui/"


async def test_a_revoked_token_ends_its_session(h: Harness) -> None:
    client = await signed_in(h, "read", name="leaver")
    assert (await client.get("/ui/")).status_code == 200
    h.service.db.write_sync(lambda tx: store.tokens.revoke_token(tx, "leaver"))
    response = await client.get("/ui/")  # token_cache_s = 0 in the harness
    assert response.status_code == 303
    assert response.headers["location"].startswith("/ui/login")
    await client.aclose()


async def test_sign_out(h: Harness) -> None:
    client = await signed_in(h, "read")
    page = await client.get("/ui/")
    bad = await client.post("/ui/logout", data={"csrf": "nope"})
    assert_page(bad, 403, "Reload")
    response = await client.post("/ui/logout", data={"csrf": form_csrf(page.text)})
    assert response.status_code == 303
    assert (await client.get("/ui/")).status_code == 303
    await client.aclose()


def test_session_signer_refuses_tampering_and_age() -> None:
    signer = SessionSigner(b"k" * 32, ttl_s=60)
    cookie, session = signer.issue("token-1")
    assert signer.read(cookie) == session
    body, signature = cookie.split(".")
    assert signer.read(f"{body}x.{signature}") is None
    assert signer.read(f"{body}.{signature[:-2]}AA") is None
    assert SessionSigner(b"j" * 32, ttl_s=60).read(cookie) is None
    assert signer.read("not a cookie") is None
    assert signer.read("a.b.c") is None
    assert (
        SessionSigner(b"k" * 32, ttl_s=-1).read(SessionSigner(b"k" * 32, -1).issue("t")[0]) is None
    )
    assert signer.check_csrf(session, signer.csrf_token(session))
    assert not signer.check_csrf(session, "")
    other = signer.issue("token-1")[1]
    assert not signer.check_csrf(other, signer.csrf_token(session))


async def test_the_session_key_is_made_once_and_shared_through_the_database(
    make_harness: Any, tmp_path: Path
) -> None:
    # Two services on one database, as two replicas: a cookie one issued is good at the
    # other, and the key is in no file of the data directory.
    first: Harness = await make_harness()
    second: Harness = await make_harness()
    assert first.service.session_key == second.service.session_key
    assert len(first.service.session_key) >= 32
    assert not (tmp_path / "data" / "session.key").exists()
    client = await signed_in(first, "read")
    elsewhere = browser(second)
    elsewhere.cookies.set(SESSION_COOKIE, client.cookies[SESSION_COOKIE])
    page = await elsewhere.get("/ui/")
    assert_page(page, 200)
    await client.aclose()
    await elsewhere.aclose()
    # session_secret wins over the shared key.
    configured: Harness = await make_harness(session_secret="s" * 40)
    assert configured.service.session_key == b"s" * 40


async def test_an_earlier_release_s_session_key_file_becomes_the_shared_key(
    make_harness: Any, tmp_path: Path
) -> None:
    settings_dir = tmp_path / "data"
    settings_dir.mkdir(parents=True, exist_ok=True)
    (settings_dir / "session.key").write_text("k" * 64 + "\n")
    h: Harness = await make_harness(data_dir=settings_dir)
    assert h.service.session_key == b"k" * 64


def test_a_short_session_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        Settings(session_secret="short", profiles={})


# -- pages ------------------------------------------------------------------------------------


async def test_pages_show_contexts_leases_runs_and_events(h: Harness) -> None:
    client = await signed_in(h, "read")
    lease = await h.lease(holder=HOLDER)
    await h.settle()
    context_id = lease["context_id"]

    overview = await client.get("/ui/")
    assert_page(overview, 200, context_id[:8], "running", "etl", "load", "Queries")
    assert "Force-stop" not in overview.text

    context = await client.get(f"/ui/contexts/{context_id}")
    assert_page(context, 200, context_id, lease["id"][:8], "None yet", "had room for etl")
    assert "Force-stop" not in context.text  # read scope: no admin buttons

    page = await client.get(f"/ui/leases/{lease['id']}")
    assert_page(page, 200, lease["id"], "manual__2026-01-01", "admin-0", "Expires in")

    runs = await client.get("/ui/runs")
    assert_page(runs, 200, "etl", "manual__2026-01-01")
    run = await client.get("/ui/runs", params={"dag_id": "etl", "run_id": "manual__2026-01-01"})
    assert_page(run, 200, "Compute time held", "load", "<svg")

    events = await client.get("/ui/events", params={"kind": "lease"})
    assert_page(events, 200, "pending", "active")

    version = await client.get("/ui/api/version")
    assert version.status_code == 200
    assert version.json()["version"] > 0

    fragment = await client.get("/ui/", headers={"X-Pclease-Fragment": "1"})
    assert fragment.status_code == 200
    assert "<html" not in fragment.text
    assert context_id[:8] in fragment.text
    await client.aclose()


async def test_idle_countdown_and_cost_after_release(h: Harness) -> None:
    client = await signed_in(h, "read")
    lease = await h.lease(holder=HOLDER)
    await h.settle()
    await h.tick(3600)  # one hour at $0.5/h
    await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    await h.tick(10)
    overview = await client.get("/ui/")
    assert_page(overview, 200, "idle", "data-until=", "20s")  # 30 s grace, 10 s gone
    assert "$0.50" in overview.text  # cost so far, rendered before it starts ticking
    await h.tick(20)
    await h.settle()
    gone = await client.get("/ui/")
    assert f'data-context="{lease["context_id"]}"' not in gone.text
    ended = await client.get("/ui/", params={"state": "ended"})
    assert_page(ended, 200, lease["context_id"][:8], "stopped")
    history = await client.get(f"/ui/contexts/{lease['context_id']}")
    assert_page(
        history,
        200,
        "idle for its grace period of 30 s",
        "the backend confirmed",
        "its idle grace ran out",  # the stop kind, not the reason text
    )
    await client.aclose()


async def test_run_page_sums_compute_time_and_cost(h: Harness) -> None:
    client = await signed_in(h, "read")
    first = await h.lease(holder={**HOLDER, "task_id": "a"})
    await h.settle()
    second = await h.lease(holder={**HOLDER, "task_id": "b"})
    await h.tick(1800)
    for lease in (first, second):
        await h.client.delete(f"/v1/leases/{lease['id']}", headers=h.headers)
    run = await client.get("/ui/runs", params={"dag_id": "etl", "run_id": HOLDER["run_id"]})
    # two leases held 30 min each on a $0.5/h profile
    assert_page(run, 200, ">1h 00m<", ">$0.5000<")
    await client.aclose()


# -- admin actions -----------------------------------------------------------------------------


async def test_admin_force_stops_with_confirmation(h: Harness) -> None:
    admin = await signed_in(h, "admin")
    lease = await h.lease(holder=HOLDER)
    await h.settle()
    context_id = lease["context_id"]
    page = await admin.get(f"/ui/contexts/{context_id}")
    assert_page(page, 200, "Force-stop")
    csrf = form_csrf(page.text)
    url = f"/ui/contexts/{context_id}/stop"

    asked = await admin.post(url, data={"csrf": csrf})
    assert_page(asked, 200, "Force-stop context", "1 live lease")
    assert (await h.context(context_id))["state"] == "running"

    forged = await admin.post(url, data={"csrf": "forged", "confirm": "yes"})
    assert_page(forged, 403, "CSRF")

    done = await admin.post(url, data={"csrf": csrf, "confirm": "yes"})
    assert done.status_code == 303
    assert (await h.context(context_id))["state"] in ("stopping", "stopped")
    assert (await h.get_lease(lease["id"]))["state"] == "revoked"
    await h.settle()
    again = await admin.post(url, data={"csrf": csrf, "confirm": "yes"})
    assert_page(again, 409, "already stopped")
    await admin.aclose()


async def test_admin_revokes_a_lease(h: Harness) -> None:
    admin = await signed_in(h, "admin")
    lease = await h.lease(holder=HOLDER)
    page = await admin.get(f"/ui/leases/{lease['id']}")
    csrf = form_csrf(page.text)
    url = f"/ui/leases/{lease['id']}/revoke"
    assert_page(await admin.post(url, data={"csrf": csrf}), 200, "Revoke lease")
    done = await admin.post(url, data={"csrf": csrf, "confirm": "yes"})
    assert done.status_code == 303
    revoked = await h.get_lease(lease["id"])
    assert revoked["state"] == "revoked"
    assert "revoked by token:admin" in revoked["end_reason"]
    assert_page(await admin.post(url, data={"csrf": csrf, "confirm": "yes"}), 409, "revoked")
    await admin.aclose()


async def test_read_scope_cannot_act(h: Harness) -> None:
    reader = await signed_in(h, "read")
    lease = await h.lease(holder=HOLDER)
    await h.settle()
    page = await reader.get(f"/ui/contexts/{lease['context_id']}")
    csrf = form_csrf(page.text)  # the sign-out form's: a valid token for this session
    for url in (f"/ui/contexts/{lease['context_id']}/stop", f"/ui/leases/{lease['id']}/revoke"):
        response = await reader.post(url, data={"csrf": csrf, "confirm": "yes"})
        assert_page(response, 403, "admin scope")
    assert (await h.context(lease["context_id"]))["state"] == "running"
    assert (await h.get_lease(lease["id"]))["state"] == "active"
    await reader.aclose()


# -- bad input ---------------------------------------------------------------------------------

UNKNOWN = "00000000-0000-4000-8000-000000000000"
BAD_PAGES = [
    ("GET", "/ui/?page=0", 422, "page"),
    ("GET", "/ui/?page=abc", 422, "page"),
    ("GET", "/ui/?state=bogus", 422, "state must be one of"),
    ("GET", "/ui/?window=2h", 422, "window must be one of"),
    ("GET", "/ui/?profile=a%00b", 422, "NUL"),
    ("GET", "/ui/?profile=" + "p" * 64, 422, "profile"),
    ("GET", f"/ui/contexts/{UNKNOWN}", 404, "No such context"),
    ("GET", "/ui/contexts/" + "a" * 500, 404, "No such context"),
    ("GET", "/ui/contexts/%00", 404, "No such context"),
    ("GET", "/ui/contexts/x'%3Cscript%3E", 404, "No such context"),
    ("GET", f"/ui/contexts/{UNKNOWN}?page=-1", 422, "page"),
    ("GET", f"/ui/leases/{UNKNOWN}", 404, "No such lease"),
    ("GET", "/ui/leases/nope!", 404, "No such lease"),
    ("GET", "/ui/runs?run_id=r1", 422, "dag_id"),
    ("GET", "/ui/runs?dag_id=%00", 422, "NUL"),
    ("GET", "/ui/runs?dag_id=" + "d" * 251, 422, "dag_id"),
    ("GET", "/ui/events?before=0", 422, "before"),
    ("GET", "/ui/events?before=x", 422, "before"),
    ("GET", "/ui/events?kind=bogus", 422, "kind must be"),
    ("GET", "/ui/nowhere", 404, "Not found"),
    ("DELETE", "/ui/", 405, "not used here"),
    ("GET", "/ui/contexts/abc/stop", 405, "not used here"),
    ("POST", f"/ui/contexts/{UNKNOWN}/stop", 404, "No such context"),
    ("POST", f"/ui/leases/{UNKNOWN}/revoke", 404, "No such lease"),
    ("POST", "/ui/leases/bad!/revoke", 404, "No such lease"),
    ("GET", "/ui/static/nope.js", 404, "Not found"),
]


async def test_bad_input_gets_a_clear_page(h: Harness) -> None:
    """Every case in BAD_PAGES: its status, an HTML page naming the problem, no traceback."""
    admin = await signed_in(h, "admin")
    page = await admin.get("/ui/")
    form = {"csrf": form_csrf(page.text), "confirm": "yes"}
    for method, url, status, word in BAD_PAGES:
        response = await admin.request(method, url, data=form if method == "POST" else None)
        assert response.status_code == status, (url, response.text[:2000])
        assert response.headers["content-type"].startswith("text/html"), url
        assert word in response.text, (url, word)
        assert "Traceback" not in response.text, url
        assert "<script>" not in response.text.split("</head>")[1], url
    await admin.aclose()


async def test_api_errors_stay_json(h: Harness) -> None:
    response = await h.client.get("/v1/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    response = await h.client.get("/v1/contexts", params={"limit": 0}, headers=h.headers)
    assert response.json()["error"]["code"] == "invalid_input"


# -- secrets -----------------------------------------------------------------------------------


async def test_no_secret_on_any_page(make_harness: Any) -> None:
    profiles = {
        **PROFILES,
        "cloud": {
            "cpus": 1,
            "memory_gb": 1,
            "polars_cloud": {"env": {"POLARS_CLOUD_CLIENT_SECRET": CLOUD_SECRET}},
        },
    }
    session_secret = "session-secret-" + "z" * 30
    h = await make_harness(profiles=profiles, session_secret=session_secret)
    token = new_token(h, "watcher", "admin")
    client = browser(h)
    signed = await sign_in(client, token)
    lease = await h.lease("cloud", holder=HOLDER)
    await h.settle()
    urls = [
        "/ui/",
        "/ui/?state=ended",
        f"/ui/contexts/{lease['context_id']}",
        f"/ui/leases/{lease['id']}",
        "/ui/runs",
        f"/ui/runs?dag_id=etl&run_id={HOLDER['run_id']}",
        "/ui/events",
        "/ui/api/version",
        "/ui/login",
        "/metrics",
    ]
    bodies = [signed.text, *signed.headers.get_list("set-cookie")]
    for url in urls:
        for headers in ({}, {"X-Pclease-Fragment": "1"}):
            response = await client.get(url, headers=headers)
            assert response.status_code == 200, url
            bodies.append(response.text)
            bodies.extend(response.headers.get_list("set-cookie"))
    forbidden = [token, principals.hash_token(token), CLOUD_SECRET, session_secret]
    forbidden.append(h.headers["Authorization"].removeprefix("Bearer "))
    for body in bodies:
        for secret in forbidden:
            assert secret not in body
    await client.aclose()


# -- health ------------------------------------------------------------------------------------


class ListRefused(MemoryBackend):
    async def list(self) -> list[Any]:
        raise BackendError("Polars Cloud refused the credentials (401); check client_id")


async def test_readyz_names_the_failing_part(h: Harness) -> None:
    ready = await h.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": "ok", "backend": "ok", "reconciler": "ok"}
    h.service.backend = ListRefused(h.clock)
    failing = await h.client.get("/readyz")
    assert failing.status_code == 503
    assert failing.json()["checks"]["backend"] == (
        "failing: Polars Cloud refused the credentials (401); check client_id"
    )
    assert failing.json()["checks"]["database"] == "ok"


# -- charts ------------------------------------------------------------------------------------


def test_usage_chart_stacks_states_and_sums_cost() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 1, 1, 12, tzinfo=UTC)
    hour = timedelta(hours=1)
    intervals = [
        Interval("a", "small", "running", now - hour, now - hour / 2, 1.0),
        Interval("a", "small", "idle", now - hour / 2, now - hour / 4, 1.0),
        Interval("b", "large", "running", now - hour / 4, None, 2.0),
    ]
    usage = charts.usage_chart(intervals, now, hour)
    assert usage.cost == pytest.approx(0.5 + 0.25 + 0.5)
    assert usage.idle_seconds == pytest.approx(900)
    assert usage.idle_cost == pytest.approx(0.25)
    assert usage.peak == pytest.approx(1.0)
    assert 'class="area running"' in usage.svg and 'class="area idle"' in usage.svg
    empty = charts.usage_chart([], now, hour)
    assert "nothing ran" in empty.svg


# -- scale -------------------------------------------------------------------------------------


async def test_overview_with_hundreds_of_contexts_and_thousands_of_leases(h: Harness) -> None:
    profile = h.service.settings.profiles["small"].model_copy(
        update={"max_contexts": 1000, "max_leases_per_context": 100}
    )
    token_id = h.service.db.read_sync(lambda tx: store.tokens.list_tokens(tx)[0].id)
    started = time.perf_counter()

    def seed(tx: Tx) -> str:
        first = ""
        for i in range(300):
            context = store.contexts.create_context(
                tx, profile, "memory", actor="seed", reason="seed"
            )
            first = first or context.id
            for j in range(10):
                store.leases.insert_lease(
                    tx,
                    context=context,
                    token_id=token_id,
                    ttl_s=30,
                    holder={"dag_id": f"dag{i % 7}", "run_id": f"run{i}", "task_id": f"t{j}"},
                    idempotency_key=None,
                    request_fingerprint=None,
                    actor="seed",
                )
        return first

    first, _ = h.service.db.write_sync(seed)
    seeded = time.perf_counter() - started
    client = await signed_in(h, "read")
    timings = {}
    for url in ("/ui/", "/ui/?page=6", f"/ui/contexts/{first}", "/ui/runs", "/ui/events"):
        begin = time.perf_counter()
        response = await client.get(url)
        timings[url] = round(time.perf_counter() - begin, 3)
        assert response.status_code == 200, url
    overview = await client.get("/ui/")
    assert "300 active" in overview.text
    assert overview.text.count("data-context=") == 50  # one page
    print(f"\nseeded 300 contexts / 3000 leases in {seeded:.2f}s; page times: {timings}")
    assert max(timings.values()) < 10  # generous: measured, not a benchmark
    await client.aclose()


def test_lease_states_render_with_a_colour() -> None:
    css = (
        Path(__file__).resolve().parents[2] / "pclease_service/dashboard/static/dashboard.css"
    ).read_text()
    for state in [*ContextState, *LeaseState]:
        assert f".s-{state.value}" in css


async def test_queries_show_on_the_pages_and_in_metrics(h: Harness) -> None:
    from pclease_service.states import QueryState

    client = await signed_in(h, "read")
    lease = await h.lease(holder=HOLDER)
    await h.settle()

    def run_query(tx: Tx) -> str:
        record = store.leases.get_lease(tx, lease["id"])
        assert record is not None
        query = store.queries.insert_query(
            tx,
            query_id=store.transitions.new_id(),
            lease_id=record.id,
            context_id=record.context_id,
            token_id=record.token_id,
            target="parquet",
            destination="/data/out/daily.parquet",
            engine="auto",
            labels={},
            client_polars_version="2.0.0",
            plan_bytes=128,
            timeout_s=60,
            actor="test",
        )
        store.queries.transition_query(
            tx,
            query.id,
            QueryState.RUNNING,
            actor="runner",
            reason="started",
            values={"started_at": tx.now},
        )
        store.queries.transition_query(
            tx,
            query.id,
            QueryState.SUCCEEDED,
            actor="runner",
            reason="done",
            values={"finished_at": tx.now, "rows": 42},
        )
        return query.id

    query_id, _ = h.service.db.write_sync(run_query)
    context = await client.get(f"/ui/contexts/{lease['context_id']}")
    assert_page(context, 200, query_id[:8], "succeeded", "daily.parquet", ">42<")
    page = await client.get(f"/ui/leases/{lease['id']}")
    assert_page(page, 200, query_id[:8])
    overview = await client.get("/ui/")
    row = overview.text.split(f'data-context="{lease["context_id"]}"')[1].split("</tr>")[0]
    assert '<td class="num">1</td>' in row
    scraped = await h.client.get("/metrics")
    assert 'pclease_queries_total{outcome="succeeded"} 1.0' in scraped.text
    await client.aclose()
