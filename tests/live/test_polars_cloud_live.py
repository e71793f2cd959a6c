"""End to end with ``backend = "polars_cloud"``: a real ``pclease serve`` process that drives
the real polars-cloud client against a fake Polars Cloud running in this test process."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import pytest
from sqlalchemy import select

from devkit.live import LiveServer, run_cli, write_config
from pclease_client import PcleaseClient, QueryFailed
from pclease_service.dashboard.sessions import LOGIN_COOKIE
from pclease_service.db.engine import create_db_engine
from pclease_service.db.schema import metadata
from tests.fakepc import FakePolarsCloud

pytestmark = pytest.mark.live

CLIENT_ID = "pc-client-id"
SECRET = "pcs_" + secrets.token_urlsafe(24)
HOLDER = {"dag_id": "d", "run_id": "r", "task_id": "t"}


def wait_until(predicate: Callable[[], Any], timeout_s: float = 20.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakePolarsCloud]:
    server = FakePolarsCloud(
        client_id=CLIENT_ID,
        client_secret=SECRET,
        workspace="pclease-ws",
        data_dir=tmp_path_factory.mktemp("fakepc"),
    ).start()
    yield server
    server.close()


@pytest.fixture
def cloud(fake: FakePolarsCloud) -> Iterator[FakePolarsCloud]:
    fake.reset(start_delay_s=0.3)
    yield fake
    fake.reset()


class Env:
    def __init__(
        self,
        tmp_path: Path,
        fake: FakePolarsCloud,
        *,
        credentials: dict[str, Any] | None = None,
        secret: str = SECRET,
        cloud_options: dict[str, Any] | None = None,
        profiles: dict[str, dict[str, Any]] | None = None,
        **settings: Any,
    ) -> None:
        self.tmp_path = tmp_path
        self.fake = fake
        self.lake = tmp_path / "lake"
        self.lake.mkdir(exist_ok=True)
        self.data_dir = tmp_path / "svc"
        self.database = tmp_path / "svc.db"
        self.config = write_config(
            tmp_path / "pclease.toml",
            {
                "data_dir": str(self.data_dir),
                "database_url": f"sqlite:///{self.database}",
                "backend": "polars_cloud",
                "reconcile_interval_s": 0.2,
                "health_check_interval_s": 0.5,
                "orphan_sweep_interval_s": 2,
                "lease_ttl_min_s": 1,
                "polars_cloud": {
                    "api_addr": fake.url,
                    "token_url": fake.token_url,
                    "workspace": "pclease-ws",
                    "request_timeout_s": 5,
                    "credentials": credentials or {"source": "env"},
                    **(cloud_options or {}),
                },
                **settings,
            },
            {
                "small": {
                    "cpus": 2,
                    "memory_gb": 4,
                    "idle_grace_s": 1,
                    "data_roots": [str(self.lake)],
                    "polars_cloud": {"idle_timeout_mins": 20},
                },
                **(profiles or {}),
            },
        )
        # Only what the service needs: no Polars Cloud variables of this test process.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("POLARS_CLOUD_")}
        self.env |= {"POLARS_CLOUD_CLIENT_ID": CLIENT_ID, "POLARS_CLOUD_CLIENT_SECRET": secret}
        run_cli(self.config, "db", "upgrade", env=self.env)
        self.token = run_cli(
            self.config, "token", "create", "etl", "--scope", "admin", env=self.env
        ).strip()
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.servers: list[LiveServer] = []

    def server(self, *, ready: bool = True) -> LiveServer:
        server = LiveServer(self.config, self.tmp_path / "server.log")
        server.env = self.env
        self.servers.append(server)
        if ready:
            return server.start()
        _start_unready(server)
        return server

    def client(self, server: LiveServer) -> PcleaseClient:
        return PcleaseClient(server.url, self.token, retries=1)

    def lease_state(self, server: LiveServer, lease_id: str) -> dict[str, Any]:
        r = httpx.get(f"{server.url}/v1/leases/{lease_id}", headers=self.headers)
        return dict(r.json())

    def close(self) -> None:
        for server in self.servers:
            server.stop()


def _start_unready(server: LiveServer) -> None:
    """Start without waiting for /readyz (which is expected to fail)."""
    import subprocess

    from devkit.live import PCLEASE

    server._log = server.log_path.open("ab")
    server.proc = subprocess.Popen(
        [*PCLEASE, "serve", "--config", str(server.config), "--port", str(server.port)],
        stdout=server._log,
        stderr=subprocess.STDOUT,
        env=server.env,
    )

    def up() -> bool:
        try:
            return httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, 30, "the server to answer /healthz")


@pytest.fixture
def make_env(tmp_path: Path, cloud: FakePolarsCloud) -> Iterator[Callable[..., Env]]:
    made: list[Env] = []

    def make(**kwargs: Any) -> Env:
        env = Env(tmp_path, cloud, **kwargs)
        made.append(env)
        return env

    yield make
    for env in made:
        env.close()


def test_one_context_for_concurrent_leases_queries_and_no_secret_anywhere(
    make_env: Callable[..., Env], cloud: FakePolarsCloud
) -> None:
    env = make_env()
    server = env.server()
    seen: list[str] = []
    leases: list[dict[str, Any]] = []

    def take() -> None:
        r = httpx.post(
            f"{server.url}/v1/leases",
            headers=env.headers,
            json={"profile": "small", "holder": HOLDER, "ttl_s": 30},
            timeout=30,
        )
        seen.append(r.text)
        leases.append(r.json())

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({lease["context_id"] for lease in leases}) == 1
    wait_until(lambda: cloud.running() and cloud.running()[0]["status"] == "Running")
    assert len(cloud.computes()) == 1
    [compute] = cloud.computes()
    assert compute["labels"]["pclease.context-id"] == leases[0]["context_id"]
    assert compute["idle_timeout_mins"] == 20
    assert compute["mode"] == "Proxy"

    client = env.client(server)
    frame = pl.DataFrame({"a": [1, 2, 3], "b": ["x", "y", "z"]})
    with client.lease("small", holder=HOLDER, ttl_s=30) as lease:
        assert lease.context_id == leases[0]["context_id"]
        out = env.lake / "out.parquet"
        lease.remote(frame.lazy().filter(pl.col("a") > 1)).sink_parquet(str(out))
        assert pl.read_parquet(out).equals(frame.filter(pl.col("a") > 1))
        got = lease.remote(frame.lazy().with_columns(c=pl.col("a") * 2)).collect()
        assert got.equals(frame.with_columns(c=pl.col("a") * 2))
        with pytest.raises(QueryFailed) as failed:
            lease.remote(frame.lazy().select("nope")).collect()
        assert failed.value.error_type == "ColumnNotFoundError"
        seen.append(str(failed.value))
    for lease_data in leases:
        seen.append(client.release(lease_data["id"]).__repr__())
    # Released and past its grace: the context is stopped on Polars Cloud.
    wait_until(lambda: not cloud.running(), 20, "the idle context to stop")
    # Probes are answered from what the service already knows: no call to Polars Cloud.
    listings = sum(c.path.endswith("/compute") and c.method == "GET" for c in cloud.calls)
    for _ in range(10):
        assert httpx.get(f"{server.url}/readyz").status_code == 200
    later = sum(c.path.endswith("/compute") and c.method == "GET" for c in cloud.calls)
    assert later - listings <= 1  # at most one sweep of the reconciler's own
    for path in ("/v1/leases", "/v1/contexts", "/v1/events", "/readyz", "/metrics"):
        seen.append(httpx.get(server.url + path, headers=env.headers).text)
    with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
        login = browser.get("/ui/login")
        csrf = login.cookies.get(LOGIN_COOKIE) or ""
        page = browser.post("/ui/login", data={"token": env.token, "csrf": csrf})
        seen.append(page.text)
        for path in ("/ui/", "/ui/events", "/ui/runs"):
            seen.append(browser.get(path).text)
    client.close()
    server.stop()
    _assert_secret_nowhere(env, server, seen, SECRET)


def _assert_secret_nowhere(env: Env, server: LiveServer, seen: list[str], secret: str) -> None:
    engine = create_db_engine(f"sqlite:///{env.database}", pool_size=1)
    with engine.connect() as conn:
        rows = "\n".join(
            repr(tuple(row))
            for table in metadata.sorted_tables
            for row in conn.execute(select(table))
        )
    engine.dispose()
    files = "\n".join(
        p.read_bytes().decode(errors="replace") for p in env.data_dir.rglob("*") if p.is_file()
    )
    calls = "\n".join(repr(call) for call in env.fake.calls)
    places = {
        "server log": server.log(),
        "responses and pages": "\n".join(seen),
        "database": rows,
        "data dir files": files,
        "the fake's recorded calls": calls,
    }
    assert rows and files and calls
    for place, text in places.items():
        assert secret not in text, f"the client secret leaked into the {place}"


def test_restart_adopts_its_context_and_stops_unknown_ones(
    make_env: Callable[..., Env], cloud: FakePolarsCloud
) -> None:
    env = make_env(cloud_options={"stop_unknown_computes": True})
    server = env.server()
    client = env.client(server)
    lease = client.create_lease("small", holder=HOLDER, ttl_s=60)
    wait_until(lambda: env.lease_state(server, lease.id)["state"] == "active")
    [ours] = cloud.running()
    server.kill()
    client.close()

    # A context the service account started that this deployment does not know.
    user = cloud.auth.subject_for(CLIENT_ID)
    stray = cloud.start_compute(cloud.workspace_id, user, {"cluster_size": 1})
    server = env.server()
    wait_until(lambda: {c["id"] for c in cloud.running()} == {ours["id"]}, 20, "the stray to stop")
    assert env.lease_state(server, lease.id)["state"] == "active"
    client = env.client(server)
    attached = client.attach(lease.id)
    assert attached.remote(pl.LazyFrame({"a": [1]})).collect().height == 1
    assert any(c["id"] == stray.id and c["status"] != "Running" for c in cloud.computes())
    client.release(lease.id)
    wait_until(lambda: not cloud.running(), 20, "the context to stop")
    client.close()


def test_a_start_killed_before_its_answer_leaves_one_cluster_and_the_leases_go_active(
    make_env: Callable[..., Env], cloud: FakePolarsCloud
) -> None:
    env = make_env()
    server = env.server()
    client = env.client(server)
    # The start request reaches Polars Cloud, which makes the cluster; the service is
    # killed before the answer arrives.
    before = {c["id"] for c in cloud.computes()}
    cloud.hang_start_answers_s = 60
    leases = [client.create_lease("small", holder=HOLDER, ttl_s=60) for _ in range(2)]
    wait_until(lambda: cloud.running(), 20, "the start request to make a cluster")
    assert {env.lease_state(server, lease.id)["state"] for lease in leases} == {"pending"}
    server.kill()
    client.close()
    cloud.hang_start_answers_s = 0

    server = env.server()
    for lease in leases:
        wait_until(
            lambda lease=lease: env.lease_state(server, lease.id)["state"] == "active",
            20,
            "the pending lease to become active",
        )
    [m] = cloud.manifests.snapshot()
    assert m["name"] == "pclease-small-0"
    assert m["env_vars"]["PCLEASE_CONTEXT_ID"] == leases[0].context_id
    [compute] = [c for c in cloud.computes() if c["id"] not in before]  # one cluster, ever
    assert m["live_cluster_id"] == compute["id"] and compute["status"] == "Running"
    client = env.client(server)
    assert client.attach(leases[0].id).remote(pl.LazyFrame({"a": [1]})).collect().height == 1
    context = client.get_context(leases[0].context_id)
    assert context.state.value == "running"
    for lease in leases:
        client.release(lease.id)
    wait_until(lambda: not cloud.running(), 20, "the context to stop")
    assert cloud.manifests.snapshot()[0]["live_cluster_id"] is None  # the slot is free
    client.close()


def test_secret_rotation_mid_lease(make_env: Callable[..., Env], cloud: FakePolarsCloud) -> None:
    env = make_env(
        credentials={
            "source": "file",
            "client_id_file": "client_id",
            "client_secret_file": "client_secret",
        }
    )
    # Relative paths would depend on the server's cwd: rewrite them absolute.
    secret_file = env.tmp_path / "client_secret"
    (env.tmp_path / "client_id").write_text(CLIENT_ID)
    secret_file.write_text(SECRET)
    text = env.config.read_text()
    text = text.replace('"client_id"', f'"{env.tmp_path / "client_id"}"', 1)
    text = text.replace('"client_secret"', f'"{secret_file}"', 1)
    env.config.write_text(text)
    env.env.pop("POLARS_CLOUD_CLIENT_SECRET")
    server = env.server()
    client = env.client(server)
    with client.lease("small", holder=HOLDER, ttl_s=30) as lease:
        assert lease.remote(pl.LazyFrame({"a": [1, 2]})).collect().height == 2
        new_secret = "pcs_" + secrets.token_urlsafe(24)
        cloud.rotate(new_secret)
        secret_file.write_text(new_secret)
        assert server.proc is not None
        changed = "the Polars Cloud service account in files"
        before = server.log().count(changed)
        issued = cloud.tokens_issued
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: server.log().count(changed) > before, 10, "the account to change")
        # The changed account got its own token before replacing the old one, and the next
        # call uses it.
        assert cloud.tokens_issued == issued + 1
        assert lease.remote(pl.LazyFrame({"a": [1, 2, 3]})).collect().height == 3
        assert cloud.tokens_issued == issued + 1
        refused = sum(c.status == 401 for c in cloud.calls)
        cloud.revoke_tokens()  # now the API refuses it: a 401, a new token, one retry
        assert lease.remote(pl.LazyFrame({"a": [1]})).collect().height == 1
        assert cloud.tokens_issued >= issued + 2
        assert sum(c.status == 401 for c in cloud.calls) > refused
        assert env.lease_state(server, lease.id)["state"] == "active"
    client.close()
    server.stop()
    assert new_secret not in server.log() and SECRET not in server.log()


def test_injected_failures_end_in_clear_errors(
    make_env: Callable[..., Env], cloud: FakePolarsCloud
) -> None:
    env = make_env()
    server = env.server()
    client = env.client(server)

    def failed_lease(what: str) -> dict[str, Any]:
        lease = client.create_lease("small", holder=HOLDER, ttl_s=30)
        return dict(
            wait_until(
                lambda: (s := env.lease_state(server, lease.id))["state"] == "failed" and s,
                20,
                what,
            )
        )

    cloud.fail_starts = 10
    lease = failed_lease("the failed start to fail the lease")
    assert "refused to start" in json.dumps(lease)
    assert not cloud.running()
    cloud.fail_starts = 0

    cloud.start_ends_failed = True
    lease = failed_lease("the failed context to fail the lease")
    assert "failed to start" in json.dumps(lease)
    assert not cloud.running()
    cloud.start_ends_failed = False

    with client.lease("small", holder=HOLDER, ttl_s=30) as held:
        cloud.error_burst(3, status=503)  # retried: the lease and its queries go on
        assert held.remote(pl.LazyFrame({"a": [1]})).collect().height == 1
        cloud.query_error = "ComputeError: boom"
        with pytest.raises(QueryFailed) as caught:
            held.remote(pl.LazyFrame({"a": [1]})).collect()
        assert (caught.value.error_type, str(caught.value).endswith("boom")) == (
            "ComputeError",
            True,
        )
        cloud.query_error = None
        cloud.fail_stops = 2  # the idle stop fails twice, then succeeds
    wait_until(lambda: not cloud.running(), 30, "the context to stop despite failing stops")

    lease = client.create_lease("small", holder=HOLDER, ttl_s=30)
    wait_until(lambda: env.lease_state(server, lease.id)["state"] == "active")
    [compute] = cloud.running()
    cloud.fail_compute(compute["id"], "the machine died")
    state = wait_until(
        lambda: (s := env.lease_state(server, lease.id))["state"] != "active" and s, 20
    )
    assert "the machine died" in json.dumps(state)
    client.close()


def test_bad_credentials_show_on_healthz_and_fail_leases_naming_the_source(
    make_env: Callable[..., Env], cloud: FakePolarsCloud
) -> None:
    wrong = "wrong-" + secrets.token_urlsafe(16)
    env = make_env(secret=wrong)
    server = env.server(ready=False)
    ready = wait_until(
        lambda: (
            (r := httpx.get(f"{server.url}/healthz")).status_code == 200
            and r.json()["checks"].get("credentials", "ok") != "ok"
            and r
        ),
        20,
        "healthz to report the credentials",
    )
    # The replica itself can serve: a load balancer must not pull it (nor all of them).
    assert httpx.get(f"{server.url}/readyz").status_code == 200
    problem = ready.json()["checks"]["credentials"]
    assert "POLARS_CLOUD_CLIENT_SECRET" in problem, problem
    r = httpx.post(
        f"{server.url}/v1/leases",
        headers=env.headers,
        json={"profile": "small", "holder": HOLDER},
    )
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "backend_unavailable"
    assert "POLARS_CLOUD_CLIENT_SECRET" in r.json()["error"]["message"]
    assert wrong not in r.text and wrong not in ready.text
    with httpx.Client(base_url=server.url, follow_redirects=True) as browser:
        login = browser.get("/ui/login")
        csrf = login.cookies.get(LOGIN_COOKIE) or ""
        page = browser.post("/ui/login", data={"token": env.token, "csrf": csrf})
    assert "Polars Cloud credentials do not work" in page.text
    assert "POLARS_CLOUD_CLIENT_SECRET" in page.text and wrong not in page.text
    assert not cloud.running()
    server.stop()
    assert wrong not in server.log()
