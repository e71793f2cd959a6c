"""The fake Polars Cloud control plane, driven by the unmodified polars-cloud client.

The client reads ``POLARS_CLOUD_API_ADDR`` once, when ``polars_cloud`` is imported, so every
client run happens in a fresh subprocess pointed at that test's fake. Checks that need no
client (OAuth, bearer rejection, error bursts) use httpx and grpc directly.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import polars as pl
import pytest

from tests.fakepc import FakePolarsCloud
from tests.fakepc.protowire import decode, encode, first_bytes

CLIENT_ID = "pc-client-id"
SECRET = "pc-client-secret"
WS = "pclease-ws"
REPO = Path(__file__).resolve().parents[2]
SUBMIT = "/polars_cloud.control_plane.client.v1.ClientService/SubmitQuery"

PRELUDE = """\
import json, sys, time
import polars as pl
import polars_cloud as pc

out = {}

def context(**kw):
    kw.setdefault("workspace", "pclease-ws")
    kw.setdefault("cpus", 2)
    kw.setdefault("memory", 4)
    kw.setdefault("connection_mode", "proxy")
    return pc.ComputeContext(**kw)

def error_of(fn):
    try:
        fn()
    except BaseException as exc:
        return [type(exc).__name__, str(exc)]
    return None
"""


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakePolarsCloud]:
    with FakePolarsCloud(
        client_id=CLIENT_ID, client_secret=SECRET, workspace=WS, data_dir=tmp_path / "fake"
    ) as f:
        yield f


def run_client(
    fake: FakePolarsCloud, tmp_path: Path, body: str, token: str | None = None
) -> dict[str, Any]:
    """Run ``body`` with the real client in a fresh process; it fills ``out``, returned here."""
    script = PRELUDE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n"
    env = {**os.environ, **fake.client_env(tmp_path / "pc-config", token)}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def oauth(fake: FakePolarsCloud, client_id: str, secret: str) -> httpx.Response:
    return httpx.post(
        fake.token_url,
        data={"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret},
    )


def rest(fake: FakePolarsCloud, path: str, token: str | None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.get(fake.url + path, headers=headers)


def submit_raw(fake: FakePolarsCloud, token: str, compute_id: str, plan: bytes) -> bytes:
    with grpc.insecure_channel(fake.url.removeprefix("http://")) as channel:
        call = channel.unary_unary(SUBMIT)
        reply: bytes = call(
            encode([(1, [(1, compute_id)]), (3, plan)]),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
        return reply


# OAuth and bearer tokens ---------------------------------------------------------------


def test_token_endpoint_rejects_wrong_credentials_and_accepts_right_ones(
    fake: FakePolarsCloud,
) -> None:
    bad = oauth(fake, CLIENT_ID, "wrong")
    assert bad.status_code == 401
    assert bad.json()["error"] == "invalid_client"
    assert oauth(fake, "someone-else", SECRET).status_code == 401
    assert fake.tokens_issued == 0

    good = oauth(fake, CLIENT_ID, SECRET)
    assert good.status_code == 200
    body = good.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    claims = json.loads(base64.urlsafe_b64decode(body["access_token"].split(".")[1] + "=="))
    assert claims["azp"] == CLIENT_ID
    assert claims["exp"] > time.time() + 3500
    assert claims["sub"]

    basic = base64.b64encode(f"{CLIENT_ID}:{SECRET}".encode()).decode()
    via_basic = httpx.post(
        fake.token_url,
        data={"grant_type": "client_credentials"},
        headers={"authorization": f"Basic {basic}"},
    )
    assert via_basic.status_code == 200
    assert fake.tokens_issued == 2
    wrong_grant = httpx.post(
        fake.token_url,
        data={"grant_type": "password", "client_id": CLIENT_ID, "client_secret": SECRET},
    )
    assert wrong_grant.status_code == 400


def test_rest_and_grpc_reject_bearers_the_fake_did_not_issue(
    fake: FakePolarsCloud, tmp_path: Path
) -> None:
    with FakePolarsCloud(
        client_id=CLIENT_ID, client_secret=SECRET, data_dir=tmp_path / "other"
    ) as other:
        foreign = other.issue_token()
    for token in (None, "not-a-jwt", foreign):
        r = rest(fake, "/api/v1/user/me", token)
        assert r.status_code == 401
        assert set(r.json()) == {"message", "errors"}
    assert rest(fake, "/api/v1/user/me", fake.issue_token()).status_code == 200

    with pytest.raises(grpc.RpcError) as err:
        submit_raw(fake, foreign, "00000000-0000-0000-0000-000000000000", b"plan")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert [(c.path, c.status) for c in fake.calls if c.path == SUBMIT] == [(SUBMIT, 401)]


def test_expired_tokens_are_rejected(tmp_path: Path) -> None:
    with FakePolarsCloud(
        client_id=CLIENT_ID, client_secret=SECRET, data_dir=tmp_path, token_ttl_s=0
    ) as f:
        assert rest(f, "/api/v1/user/me", f.issue_token()).status_code == 401


def test_rotate_changes_credentials_and_keeps_issued_tokens(fake: FakePolarsCloud) -> None:
    old_token = oauth(fake, CLIENT_ID, SECRET).json()["access_token"]
    fake.rotate(client_secret="new-secret")
    assert oauth(fake, CLIENT_ID, SECRET).status_code == 401
    assert oauth(fake, CLIENT_ID, "new-secret").status_code == 200
    assert rest(fake, "/api/v1/user/me", old_token).status_code == 200

    fake.rotate(client_secret="third", client_id="new-id")
    assert oauth(fake, CLIENT_ID, "third").status_code == 401
    assert oauth(fake, "new-id", "third").status_code == 200


def test_revoke_tokens_rejects_everything_issued_so_far(
    fake: FakePolarsCloud, tmp_path: Path
) -> None:
    token = fake.issue_token()
    assert rest(fake, "/api/v1/user/me", token).status_code == 200
    fake.revoke_tokens()
    assert rest(fake, "/api/v1/user/me", token).status_code == 401
    assert rest(fake, "/api/v1/user/me", fake.issue_token()).status_code == 200

    out = run_client(
        fake, tmp_path, "out['err'] = error_of(lambda: context().start())", token=token
    )
    assert out["err"] is not None
    assert "401" in out["err"][1]
    assert fake.computes() == []


def test_error_burst_answers_the_next_calls_but_spares_the_token_endpoint(
    fake: FakePolarsCloud,
) -> None:
    token = fake.issue_token()
    fake.error_burst(2, status=503)
    assert oauth(fake, CLIENT_ID, SECRET).status_code == 200
    codes = [rest(fake, "/api/v1/user/me", token).status_code for _ in range(3)]
    assert codes == [503, 503, 200]


# computes through the real client ------------------------------------------------------


def test_client_starts_lists_and_stops_a_compute(fake: FakePolarsCloud, tmp_path: Path) -> None:
    out = run_client(
        fake,
        tmp_path,
        """
        ctx = context(labels=["pclease-context=ctx-1", "owner:airflow"], idle_timeout_mins=7)
        ctx.start(wait=True)
        out["id"] = str(ctx._compute_id)
        out["status"] = str(ctx.get_status())
        out["listed"] = [
            [str(c._compute_id), str(s), c.connection_mode, c.cpus, c.memory, c.labels]
            for c, s in pc.ComputeContext.list("pclease-ws")
        ]
        ctx.stop()
        again = pc.ComputeContext.list("pclease-ws")
        out["after_stop"] = [str(s) for _, s in again]
        """,
    )
    assert out["status"] == "ComputeContextStatus.RUNNING"
    # The client's compute model has no labels: list() cannot hand them back.
    assert out["listed"] == [[out["id"], "ComputeContextStatus.RUNNING", "proxy", 2, 4, None]]
    assert out["after_stop"] == ["ComputeContextStatus.STOPPED"]

    [compute] = fake.computes()
    assert compute["id"] == out["id"]
    assert compute["status"] == "Stopped"
    assert compute["labels"] == {"pclease-context": "ctx-1", "owner": "airflow"}
    assert compute["label_list"] == ["pclease-context=ctx-1", "owner:airflow"]
    assert (compute["cpus"], compute["ram_gb"], compute["cluster_size"]) == (2, 4, 1)
    assert compute["idle_timeout_mins"] == 7
    assert compute["mode"] == "Proxy"
    assert compute["workspace_id"] == fake.workspace_id
    assert compute["termination"]["termination_reason"] == "StoppedByUser"
    assert fake.running() == []
    assert all(c.bearer for c in fake.calls if c.path.startswith("/api/"))


def test_start_delay_keeps_a_compute_starting(fake: FakePolarsCloud, tmp_path: Path) -> None:
    fake.start_delay_s = 0.8
    out = run_client(
        fake,
        tmp_path,
        """
        ctx = context()
        ctx.start(wait=False)
        out["first"] = str(ctx.get_status())
        time.sleep(1.0)
        out["later"] = str(ctx.get_status())
        """,
    )
    assert out["first"] == "ComputeContextStatus.STARTING"
    assert out["later"] == "ComputeContextStatus.RUNNING"


def test_fail_starts_answers_500_then_recovers(fake: FakePolarsCloud, tmp_path: Path) -> None:
    fake.fail_starts = 1
    out = run_client(
        fake,
        tmp_path,
        """
        out["err"] = error_of(lambda: context().start())
        ctx = context()
        ctx.start(wait=True)
        out["second"] = str(ctx.get_status())
        """,
    )
    assert out["err"] is not None
    assert "compute start failed" in out["err"][1]
    starts = [c.status for c in fake.calls if c.path.endswith("/compute/start")]
    assert starts == [500, 200]
    assert out["second"] == "ComputeContextStatus.RUNNING"
    assert len(fake.computes()) == 1
    assert fake.fail_starts == 0


def test_start_ends_failed_makes_the_client_give_up(fake: FakePolarsCloud, tmp_path: Path) -> None:
    fake.start_ends_failed = True
    out = run_client(fake, tmp_path, "out['err'] = error_of(lambda: context().start(wait=True))")
    assert out["err"][0] == "RuntimeError"
    assert "terminal state" in out["err"][1]
    [compute] = fake.computes()
    assert compute["status"] == "Failed"
    assert compute["termination"]["termination_reason"] == "Failed"


def test_fail_stops_and_stop_delay(fake: FakePolarsCloud, tmp_path: Path) -> None:
    fake.fail_stops = 1
    fake.stop_delay_s = 0.5
    out = run_client(
        fake,
        tmp_path,
        """
        ctx = context()
        ctx.start(wait=True)
        out["err"] = error_of(ctx.stop)
        out["still"] = str(ctx.get_status())
        ctx.stop()
        [(c, s)] = pc.ComputeContext.list("pclease-ws")
        out["stopping"] = str(s)
        """,
    )
    assert out["err"] is not None
    assert "compute stop failed" in out["err"][1]
    assert [c.status for c in fake.calls if c.path.endswith("/stop")] == [500, 200]
    assert out["still"] == "ComputeContextStatus.RUNNING"
    assert out["stopping"] == "ComputeContextStatus.STOPPING"
    time.sleep(0.6)
    assert [c["status"] for c in fake.computes()] == ["Stopped"]


def test_fail_compute_turns_a_running_compute_failed(fake: FakePolarsCloud, tmp_path: Path) -> None:
    out = run_client(
        fake, tmp_path, "c = context(); c.start(wait=True); out['id'] = str(c._compute_id)"
    )
    fake.fail_compute(out["id"], message="spot instance reclaimed")
    token = fake.issue_token()
    body = rest(fake, f"/api/v1/workspace/{fake.workspace_id}/compute/{out['id']}", token).json()
    assert body["status"] == "Failed"
    assert body["termination"]["termination_message"] == "spot instance reclaimed"
    assert fake.running() == []


# manifests (named compute contexts) through the real client ----------------------------


def test_manifests_register_find_start_once_and_unregister(
    fake: FakePolarsCloud, tmp_path: Path
) -> None:
    out = run_client(
        fake,
        tmp_path,
        """
        ws = pc.Workspace(name="pclease-ws")
        out["missing"] = error_of(lambda: pc.ComputeContext(workspace=ws, name="m"))
        spec = context(labels=["a=b"], env_vars={"X": "1"}, idle_timeout_mins=20)
        spec.register("m")
        named = pc.ComputeContext(workspace=ws, name="m")
        out["before"] = str(named.get_status())
        named.start()
        out["first"] = str(named._compute_id)
        # Starting the manifest again answers its live cluster; so does connecting by name.
        out["again"] = str(pc.constants.API_CLIENT.start_compute_cluster_manifest(ws.id, "m").id)
        out["by_name"] = str(pc.ComputeContext(workspace=ws, name="m")._compute_id)
        m = pc.constants.API_CLIENT.get_compute_cluster_manifest(ws.id, "m")
        out["manifest"] = [
            m.name, m.req_cpu_cores, m.req_ram_gb, str(m.mode), m.idle_timeout_mins,
            m.env_vars, m.polars_version, m.python_version, str(m.live_cluster_id),
        ]
        context(cpus=4, memory=8).register("m")  # registering again replaces the specs
        out["grown"] = pc.constants.API_CLIENT.get_compute_cluster_manifest(
            ws.id, "m"
        ).req_cpu_cores
        named.stop()
        out["after_stop"] = str(
            pc.constants.API_CLIENT.get_compute_cluster_manifest(ws.id, "m").live_cluster_id
        )
        named2 = pc.ComputeContext(workspace=ws, name="m")
        named2.start()
        out["second"] = str(named2._compute_id)
        named2.stop()
        named2.unregister()
        out["gone"] = error_of(lambda: pc.ComputeContext(workspace=ws, name="m"))
        """,
    )
    assert out["missing"][0] == "NotFoundError"
    assert out["before"] == "ComputeContextStatus.UNINITIALIZED"
    assert out["again"] == out["by_name"] == out["first"]
    name, cpus, ram, mode, idle, env, polars, python, live = out["manifest"]
    assert (name, cpus, ram, mode, idle, env) == (
        "m",
        2,
        4,
        "DBClusterModeModel.Proxy",
        20,
        {"X": "1"},
    )
    assert polars == pl.__version__ and python.count(".") == 2
    assert live == out["first"]
    assert out["grown"] == 4
    assert out["after_stop"] == "None"
    assert out["second"] != out["first"]
    assert out["gone"][0] == "NotFoundError"
    first, second = fake.computes()
    assert (first["name"], first["cpus"], second["name"], second["cpus"]) == ("m", 2, "m", 4)
    assert first["labels"] == {"a": "b"}
    assert fake.manifests.snapshot() == []
    paths = {
        (c.method, c.path.rsplit("/manifest", 1)[-1]) for c in fake.calls if "/manifest" in c.path
    }
    assert paths == {("POST", ""), ("GET", "/find"), ("POST", "/start"), ("DELETE", "")}


def test_a_lost_manifest_start_made_the_one_cluster_a_retry_answers(
    fake: FakePolarsCloud, tmp_path: Path
) -> None:
    fake.lose_start_answers = 1
    fake.fail_starts = 1
    out = run_client(
        fake,
        tmp_path,
        """
        ws = pc.Workspace(name="pclease-ws")
        context().register("m")
        start = lambda: pc.constants.API_CLIENT.start_compute_cluster_manifest(ws.id, "m")
        out["failed"] = error_of(start)
        out["lost"] = error_of(start)
        out["retry"] = str(start().id)
        """,
    )
    assert "compute start failed" in out["failed"][1]
    assert "answer was lost" in out["lost"][1]
    [compute] = fake.computes()
    assert out["retry"] == compute["id"]
    [m] = fake.manifests.snapshot()
    assert m["live_cluster_id"] == compute["id"]
    assert m["starts"] == [compute["id"], compute["id"]]
    statuses = [c.status for c in fake.calls if c.path.endswith("/manifest/start")]
    assert statuses == [500, 500, 200]
    fake.reset()
    assert fake.manifests.snapshot() == [] and fake.running() == []


# queries through the real client -------------------------------------------------------


def test_queries_sink_and_execute_for_real(fake: FakePolarsCloud, tmp_path: Path) -> None:
    target = tmp_path / "out.parquet"
    out = run_client(
        fake,
        tmp_path,
        f"""
        ctx = context()
        ctx.start(wait=True)
        lf = pl.LazyFrame({{"a": [1, 2, 3]}}).with_columns(b=pl.col("a") * 10)
        sunk = lf.remote(ctx).single_node().sink_parquet({str(target)!r}).await_result()
        out["sink"] = [str(sunk.status), sunk.n_rows_total, sunk.location]
        remote = lf.filter(pl.col("a") > 1).remote(ctx).labels(["lease=l-1", "x"])
        res = remote.single_node().execute()
        out["execute"] = [str(res.status), res.n_rows_total, res.file_type, res.location]
        out["frame"] = res.lazy().collect().to_dict(as_series=False)
        """,
    )
    assert out["sink"] == ["QueryStatus.SUCCESS", 3, [str(target)]]
    assert pl.read_parquet(target).to_dict(as_series=False) == {"a": [1, 2, 3], "b": [10, 20, 30]}

    status, n_rows, file_type, [location] = out["execute"]
    assert (status, n_rows, file_type) == ("QueryStatus.SUCCESS", 2, "parquet")
    assert Path(location).is_absolute()
    assert Path(location).is_relative_to(fake.data_dir)
    assert out["frame"] == {"a": [2, 3], "b": [20, 30]}

    queries = fake.queries()
    assert [q["status"] for q in queries] == ["Success", "Success"]
    assert [q["n_rows"] for q in queries] == [3, 2]
    assert [q["labels"] for q in queries] == [[], ["lease=l-1", "x"]]
    grpc_calls = [c for c in fake.calls if c.path.startswith("/polars_cloud.")]
    assert {c.path.rsplit("/", 1)[1] for c in grpc_calls} == {"SubmitQuery", "GetQueryResult"}
    assert all(c.bearer and c.status == 200 for c in grpc_calls)


def test_the_query_settings_of_the_real_client_are_read_and_recorded(
    fake: FakePolarsCloud, tmp_path: Path
) -> None:
    """What ``lf.remote(ctx).single_node()`` and ``.distributed(...)`` send, as the fake
    reads it; the distributed query still writes its real output."""
    single, spread = tmp_path / "single.parquet", tmp_path / "spread.parquet"
    run_client(
        fake,
        tmp_path,
        f"""
        ctx = context(cluster_size=3)
        ctx.start(wait=True)
        lf = pl.LazyFrame({{"a": [1, 2, 3]}})
        streaming = lf.remote(ctx, engine="streaming").single_node()
        streaming.sink_parquet({str(single)!r}).await_result()
        lf.remote(ctx).distributed(
            shuffle_compression="zstd", shuffle_format="ipc", shuffle_compression_level=7,
            equi_join_broadcast_limit=1000, partitions_per_worker=5, single_worker_ops="forbid",
            expression_lowering=True, min_workers=2, max_workers=3,
        ).sink_parquet({str(spread)!r}, sink_to_single_file=True).await_result()
        lf.remote(ctx).distributed(
            shuffle_compression="lz4", shuffle_format="parquet", single_worker_ops="allow",
            expression_lowering=False,
        ).sink_parquet({str(spread)!r}, sink_to_single_file=True).await_result()
        """,
    )
    first, second, third = (q["settings"] for q in fake.queries())
    assert first == {
        "engine": "streaming",
        "mode": "single-node",
        "min_workers": None,
        "max_workers": None,
    }
    assert second == {
        "engine": "auto",
        "mode": "distributed",
        "min_workers": 2,
        "max_workers": 3,
        "shuffle_format": "ipc",
        "shuffle_compression": "zstd",
        "shuffle_compression_level": 7,
        "sort_partitioned": True,
        "pre_aggregation": True,
        "equi_join_broadcast_limit": 1000,
        "partitions_per_worker": 5,
        "single_worker_ops": "forbid",
        "expression_lowering": True,
        "planner": "auto",
    }
    assert third | {"min_workers": None} == {
        **second,
        "min_workers": None,
        "max_workers": None,
        "shuffle_format": "parquet",
        "shuffle_compression": "lz4",
        "shuffle_compression_level": None,
        "equi_join_broadcast_limit": 256 * 1024**2,
        "partitions_per_worker": None,
        "single_worker_ops": "allow",
        "expression_lowering": False,
    }
    assert [q["status"] for q in fake.queries()] == ["Success"] * 3
    assert pl.read_parquet(spread).to_dict(as_series=False) == {"a": [1, 2, 3]}


def test_failing_queries_raise_the_polars_error_class(
    fake: FakePolarsCloud, tmp_path: Path
) -> None:
    out = run_client(
        fake,
        tmp_path,
        """
        ctx = context()
        ctx.start(wait=True)
        lf = pl.LazyFrame({"a": [1]})
        out["missing"] = error_of(lambda: lf.select("zzz").remote(ctx).single_node().execute())
        """,
    )
    assert out["missing"][0] == "ColumnNotFoundError"
    assert "zzz" in out["missing"][1]
    [failed] = fake.queries()
    assert failed["status"] == "Failed"
    assert failed["error"].startswith("ColumnNotFoundError: ")


def test_query_error_knob_fails_every_query(fake: FakePolarsCloud, tmp_path: Path) -> None:
    fake.query_error = "ComputeError: boom"
    out = run_client(
        fake,
        tmp_path,
        """
        ctx = context()
        ctx.start(wait=True)
        lf = pl.LazyFrame({"a": [1]})
        out["err"] = error_of(lambda: lf.remote(ctx).single_node().execute())
        """,
    )
    assert out["err"] == ["ComputeError", "boom"]
    assert [q["error"] for q in fake.queries()] == ["ComputeError: boom"]


def test_query_delay_and_cancel(fake: FakePolarsCloud, tmp_path: Path) -> None:
    fake.query_delay_s = 30
    out = run_client(
        fake,
        tmp_path,
        """
        ctx = context()
        ctx.start(wait=True)
        q = pl.LazyFrame({"a": [1]}).remote(ctx).single_node().execute(blocking=False)
        time.sleep(0.3)
        out["before"] = str(q.get_status())
        q.cancel()
        out["after"] = str(q.get_status())
        """,
    )
    assert out["before"] == "QueryStatus.INPROGRESS"
    assert out["after"] == "QueryStatus.CANCELED"
    assert [q["status"] for q in fake.queries()] == ["Canceled"]


def test_queries_need_a_running_compute(fake: FakePolarsCloud) -> None:
    fake.start_delay_s = 60
    token = fake.issue_token()
    started = httpx.post(
        f"{fake.url}/api/v1/workspace/{fake.workspace_id}/compute/start",
        json={"specs": {"cpus": 1, "ram_gb": 1}, "cluster_size": 1, "labels": []},
        headers={"authorization": f"Bearer {token}"},
    ).json()
    assert started["status"] == "Starting"
    with pytest.raises(grpc.RpcError) as err:
        submit_raw(fake, token, started["id"], b"plan")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_submit_reply_carries_the_query_id(fake: FakePolarsCloud) -> None:
    token = fake.issue_token()
    started = httpx.post(
        f"{fake.url}/api/v1/workspace/{fake.workspace_id}/compute/start",
        json={"specs": {"cpus": 1, "ram_gb": 1}, "cluster_size": 1, "labels": []},
        headers={"authorization": f"Bearer {token}"},
    ).json()
    fake.query_delay_s = 30  # never runs the bogus plan
    reply = submit_raw(fake, token, started["id"], b"not a plan")
    inner = first_bytes(decode(reply), 1)
    assert inner is not None
    query_id = first_bytes(decode(inner), 1)
    assert query_id is not None
    assert [q["id"] for q in fake.queries()] == [query_id.decode()]


# standalone -----------------------------------------------------------------------------


def test_standalone_module_prints_its_url_and_serves(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("s3cret\n")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tests.fakepc", "--port", "0", "--client-id", "cli"),
            *("--client-secret-file", str(secret_file), "--data-dir", str(tmp_path / "d")),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        r = httpx.post(
            url + "/realms/Polars/protocol/openid-connect/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "cli",
                "client_secret": "s3cret",
            },
        )
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_lost_start_answer_still_creates_the_compute_and_reset_restores_everything(
    fake: FakePolarsCloud,
) -> None:
    token = fake.issue_token()
    start = f"/api/v1/workspace/{fake.workspace_id}/compute/start"
    body = {"specs": {"cpus": 2, "ram_gb": 4}, "cluster_size": 1}
    fake.lose_start_answers = 1
    lost = httpx.post(fake.url + start, json=body, headers={"authorization": f"Bearer {token}"})
    assert lost.status_code == 500
    assert len(fake.running()) == 1  # created all the same
    fake.hang_start_answers_s = 0.5
    began = time.monotonic()
    held = httpx.post(fake.url + start, json=body, headers={"authorization": f"Bearer {token}"})
    assert held.status_code == 200 and time.monotonic() - began >= 0.5
    fake.rotate("another-secret")
    fake.error_burst(5)

    fake.reset(fail_stops=2)
    assert fake.running() == []
    assert (fake.hang_start_answers_s, fake.lose_start_answers, fake.fail_stops) == (0.0, 0, 2)
    assert oauth(fake, CLIENT_ID, SECRET).status_code == 200
    assert rest(fake, f"/api/v1/workspace/{fake.workspace_id}", token).status_code == 200
    with pytest.raises(TypeError, match="unknown knob"):
        fake.reset(no_such_knob=1)
