"""The dashboard and the API docs in a real headless Chromium (Debian's, driven by
Playwright) against a real ``pclease serve``: sign in, watch a context appear, count down and
stop, force-stop as admin, and be refused as a read token; /docs shows every operation of
the OpenAPI document, from files the service serves itself. Screenshots of the main pages
are taken on every run (into a temporary folder); ``PCLEASE_UPDATE_SCREENSHOTS=1`` writes
them to ``docs/``, where the README shows them.

An hour of finished history is seeded through the store (with past clock readings) before
the server starts, so the chart has something to show; everything asserted happens live.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from devkit.live import LiveServer, run_cli, write_config
from pclease_service import store
from pclease_service.config import Profile
from pclease_service.contexts import lifecycle
from pclease_service.db.engine import create_db_engine
from pclease_service.db.tx import Tx
from pclease_service.states import LeaseState, StopKind

pytestmark = [pytest.mark.browser, pytest.mark.live]

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = Path(__file__).resolve().parents[2] / "docs"
SHOTS = (
    DOCS
    if os.environ.get("PCLEASE_UPDATE_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="pclease-shots-"))
)
PROFILES: dict[str, dict[str, Any]] = {
    "small": {"cpus": 2, "memory_gb": 4, "idle_grace_s": 4, "hourly_cost": 0.6},
    "large": {"cpus": 16, "memory_gb": 64, "idle_grace_s": 600, "hourly_cost": 4.8},
    "gpu": {"cpus": 8, "memory_gb": 32, "idle_grace_s": 600, "hourly_cost": 9.5},
}

QUOTAS = """
[quotas.tokens.airflow]
max_live_leases = 20
max_instance_hours_per_day = 48

[quotas.tokens.airflow.profiles.large]
max_live_contexts = 2
monthly_budget = 2000.0

[quotas.tokens.airflow.profiles.gpu]
max_live_contexts = 1
monthly_budget = 5000.0

[quotas.tokens.data-science]
max_live_leases = 5
"""


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.database_url = f"sqlite:///{tmp_path / 'pclease.db'}"
        self.config = write_config(
            tmp_path / "pclease.toml",
            {
                "data_dir": str(tmp_path / "data"),
                "database_url": self.database_url,
                "backend": "memory",
                "reconcile_interval_s": 0.2,
                "health_check_interval_s": 1,
                "orphan_sweep_interval_s": 60,
                "lease_ttl_min_s": 1,
                "token_cache_s": 0,
            },
            PROFILES,
        )
        self.config.write_text(self.config.read_text() + QUOTAS)
        run_cli(self.config, "db", "upgrade")
        self.admin = self.token("ops-admin", "admin")
        self.reader = self.token("ops-viewer", "read")
        self.airflow = self.token("airflow", "lease")
        seed_history(self.database_url)
        self.server = LiveServer(self.config, tmp_path / "server.log").start()
        self.http = httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.airflow}"},
            timeout=30,
        )

    def token(self, name: str, scope: str) -> str:
        return run_cli(self.config, "token", "create", name, "--scope", scope).strip()

    def lease(self, profile: str, dag: str, run: str, task: str, ttl_s: float = 600) -> Any:
        response = self.http.post(
            "/v1/leases",
            json={
                "profile": profile,
                "ttl_s": ttl_s,
                "holder": {"dag_id": dag, "run_id": run, "task_id": task, "try_number": 1},
            },
        )
        assert response.status_code == 201, response.text
        return response.json()


def seed_history(database_url: str) -> None:
    """Finished contexts over the last hour: runs, idle spells and stops, with reasons."""
    engine = create_db_engine(database_url, pool_size=1)
    now = datetime.now(UTC)
    profiles = {name: Profile(name=name, **values) for name, values in PROFILES.items()}
    with engine.begin() as conn:
        store.profiles.sync_profiles(Tx(conn, now), PROFILES)
        token_id = store.tokens.token_by_name(Tx(conn, now), "airflow")
        assert token_id is not None
    plan = [
        ("large", 58, 22, 6, "nightly_etl", "scheduled__2026-11-23T00:00", "transform"),
        ("small", 55, 5, 3, "nightly_etl", "scheduled__2026-11-23T00:00", "extract"),
        ("gpu", 47, 12, 10, "train_model", "manual__2026-11-23T09:12", "fit"),
        ("small", 40, 9, 2, "reporting", "scheduled__2026-11-23T09:00", "daily_kpis"),
        ("large", 33, 14, 10, "features", "scheduled__2026-11-23T09:30", "aggregate"),
        ("small", 26, 3, 4, "reporting", "scheduled__2026-11-23T09:30", "daily_kpis"),
        ("large", 18, 7, 10, "features", "scheduled__2026-11-23T09:45", "aggregate"),
    ]
    for name, start_ago, held_min, idle_min, dag, run, task in plan:
        profile = profiles[name]
        at = now - timedelta(minutes=start_ago)

        def step(minutes: float, fn: Any, at: datetime = at) -> Any:
            with engine.begin() as conn:
                return fn(Tx(conn, at + timedelta(minutes=minutes)))

        context = step(
            0,
            lambda tx, p=profile: store.contexts.create_context(
                tx, p, "memory", actor="token:airflow", reason=f"no context of {p.name!r} had room"
            ),
        )
        lease = step(
            0,
            lambda tx, c=context, d=dag, r=run, t=task: store.leases.insert_lease(
                tx,
                context=c,
                token_id=token_id.id,
                ttl_s=60,
                holder={"dag_id": d, "run_id": r, "task_id": t},
                idempotency_key=None,
                request_fingerprint=None,
                actor="token:airflow",
            ),
        )
        step(1, lambda tx, c=context: lifecycle.started(tx, c.id, actor="reconciler"))
        step(
            1 + held_min,
            lambda tx, x=lease: store.leases.end_lease(
                tx,
                x.id,
                LeaseState.RELEASED,
                actor="token:airflow",
                reason="released by token:airflow",
            ),
        )
        stop_at = 1 + held_min + idle_min
        step(
            stop_at,
            lambda tx, c=context, p=profile: store.contexts.begin_idle_stop(
                tx,
                c.id,
                idle_since=tx.now,
                kind=StopKind.IDLE,
                actor="reconciler",
                reason=f"idle for its grace period of {p.idle_grace_s:g} s",
            ),
        )
        step(
            stop_at + 0.2,
            lambda tx, c=context: store.contexts.mark_stopped(tx, c.id, actor="reconciler"),
        )
    engine.dispose()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("browser"))
    yield environment
    environment.http.close()
    environment.server.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/bootstrap (it installs Debian's chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def sign_in(chromium: Any, env: Env, token: str) -> Any:
    context = chromium.new_context(viewport={"width": 1360, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.goto(f"{env.server.url}/ui/")
    assert "/ui/login" in page.url
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{env.server.url}/ui/")
    return page


def shot(page: Any, name: str) -> None:
    path = SHOTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, f"{name}: the screenshot looks empty"


def test_watch_a_context_live_then_force_stop_as_admin(chromium: Any, env: Env) -> None:
    expect = sync_api.expect
    viewer = sign_in(chromium, env, env.reader)
    login_shot = chromium.new_page(viewport={"width": 1360, "height": 700})
    login_shot.goto(f"{env.server.url}/ui/login")
    shot(login_shot, "login")
    login_shot.close()
    expect(viewer.locator("[data-testid=contexts]")).to_have_count(0)
    viewer.evaluate("window.__notReloaded = true")

    # A lease appears without a reload.
    etl = env.lease("small", "nightly_etl", "scheduled__2026-11-23T10:00", "load")
    row = viewer.locator(f'[data-context="{etl["context_id"]}"]')
    expect(row).to_be_visible()
    expect(row.locator(".badge")).to_have_text("running")
    assert viewer.evaluate("window.__notReloaded") is True

    # More work, for the pictures and the admin part.
    big = env.lease("large", "features", "scheduled__2026-11-23T10:00", "aggregate")
    env.lease("large", "features", "scheduled__2026-11-23T10:00", "join")
    gpu = env.lease("gpu", "train_model", "manual__2026-11-23T10:05", "fit")
    env.lease("gpu", "train_model", "manual__2026-11-23T10:05", "evaluate")
    expect(viewer.locator(f'[data-context="{gpu["context_id"]}"]')).to_be_visible()
    expect(viewer.locator("[data-testid=instances-up]")).to_have_text("3")

    # Released: idle, with a countdown that ticks, then stopped.
    assert env.http.delete(f"/v1/leases/{etl['id']}").status_code == 200
    expect(row.locator(".badge")).to_have_text("idle")
    countdown = row.locator(".countdown")
    expect(countdown).not_to_have_text(countdown.inner_text(), timeout=3_000)  # it ticks
    shot(viewer, "overview")
    viewer.goto(f"{env.server.url}/ui/contexts/{etl['context_id']}")
    expect(viewer.locator("h1 .badge")).to_have_text("idle")
    shot(viewer, "context")
    expect(viewer.locator("h1 .badge")).to_have_text("stopped", timeout=20_000)
    expect(viewer.locator("table.events")).to_contain_text("idle for its grace period of 4 s")
    viewer.goto(f"{env.server.url}/ui/")
    expect(row).to_have_count(0)

    # A read token sees no admin button, and the server refuses the form anyway.
    viewer.goto(f"{env.server.url}/ui/contexts/{big['context_id']}")
    expect(viewer.locator("[data-testid=force-stop]")).to_have_count(0)
    csrf = viewer.locator("input[name=csrf]").first.get_attribute("value")
    refused = viewer.request.post(
        f"{env.server.url}/ui/contexts/{big['context_id']}/stop",
        form={"csrf": csrf, "confirm": "yes"},
    )
    assert refused.status == 403
    assert "admin scope" in refused.text()

    # The admin force-stops another context after confirming.
    admin = sign_in(chromium, env, env.admin)
    admin.goto(f"{env.server.url}/ui/leases/{gpu['id']}")
    expect(admin.locator("[data-testid=revoke]")).to_be_visible()
    shot(admin, "lease")
    admin.goto(f"{env.server.url}/ui/contexts/{big['context_id']}")
    dialogs: list[str] = []

    def accept(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    admin.on("dialog", accept)
    admin.click("[data-testid=force-stop]")
    admin.wait_for_url(re.compile(r".*done=stopped"))
    assert dialogs and "Force-stop context" in dialogs[0]
    expect(admin.locator(".notice")).to_contain_text("Force-stop requested")
    expect(admin.locator("h1 .badge")).to_have_text("stopped", timeout=20_000)
    lease = env.http.get(f"/v1/leases/{big['id']}").json()
    assert lease["state"] == "revoked"

    # The rest of the pages, for the README.
    admin.goto(f"{env.server.url}/ui/runs?dag_id=nightly_etl&run_id=scheduled__2026-11-23T00:00")
    expect(admin.locator("[data-testid=run-held]")).to_be_visible()
    shot(admin, "run")
    admin.goto(f"{env.server.url}/ui/events")
    shot(admin, "events")
    admin.goto(f"{env.server.url}/ui/usage")
    expect(admin.locator('tr[data-token="airflow"][data-profile="gpu"]')).to_contain_text("1 / 1")
    expect(admin.locator('tr[data-token="data-science"]')).to_contain_text("0 / 5")
    shot(admin, "usage")
    admin.goto(f"{env.server.url}/ui/")
    expect(admin.locator("[data-testid=instances-up]")).to_have_text("1")
    admin.context.close()
    viewer.context.close()
    assert "Traceback" not in env.server.log()


def test_api_docs_render_every_operation_without_leaving_the_service(
    chromium: Any, env: Env
) -> None:
    expect = sync_api.expect
    document = httpx.get(f"{env.server.url}/openapi.json")
    assert document.status_code == 200, document.text
    operations = [(m, p) for p, item in document.json()["paths"].items() for m in item]
    assert len(operations) >= 19

    page = chromium.new_page(viewport={"width": 1360, "height": 900})
    elsewhere: list[str] = []

    def only_the_service(route: Any) -> None:
        if route.request.url.startswith(env.server.url):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_service)
    page.goto(f"{env.server.url}/docs")
    expect(page.locator(".opblock")).to_have_count(len(operations), timeout=15_000)
    for method, path in operations:
        summary = page.locator(f'.opblock-{method} .opblock-summary-path[data-path="{path}"]')
        expect(summary).to_have_count(1)
    expect(page.locator(".btn.authorize")).to_be_visible()  # the bearer scheme is declared
    expect(page.locator(".errors-wrapper")).to_have_count(0)

    # The lease request shows its example, and the error body its required fields.
    page.locator('.opblock-post .opblock-summary-path[data-path="/v1/leases"]').click()
    body = page.locator(".opblock-post.is-open .opblock-body")
    expect(body).to_contain_text("nightly_etl")
    expect(body).to_contain_text("The profile is at capacity")
    assert elsewhere == [], f"the docs page fetched from outside the service: {elsewhere}"
    page.close()
