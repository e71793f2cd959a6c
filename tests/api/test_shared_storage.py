"""Two services on one database, each with its own data directory (two replicas on two
machines): a query submitted through one is run and read through the other when plans and
results live in shared storage (the database, or S3 as moto's real HTTP server)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pytest

from pclease_client import build_submission
from pclease_service.backends.base import QueryOutcome
from tests.harness import Harness
from tests.moto import moto_server

RESULT = b"ARROW1 the result bytes"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture(params=["database", "s3"])
def storage(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, Any]:
    if request.param == "database":
        return {"kind": "database"}
    moto_url = request.getfixturevalue("moto_url")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    bucket = f"pclease-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return {"kind": "s3", "url": f"s3://{bucket}/spool/", "endpoint_url": moto_url}


#: Over one chunk of the storage: served as a stream rather than read at once.
LARGE_RESULT = b"ARROW1" + bytes(range(256)) * (3 * 4096 + 7)


@pytest.mark.parametrize("result_bytes", [RESULT, LARGE_RESULT], ids=["small", "streamed"])
async def test_a_query_submitted_through_one_replica_is_run_and_read_through_another(
    make_harness: Any, storage: dict[str, Any], tmp_path: Path, result_bytes: bytes
) -> None:
    a: Harness = await make_harness(data_dir=tmp_path / "a", storage=storage)
    b: Harness = await make_harness(data_dir=tmp_path / "b", storage=storage)
    lease = await a.lease()
    await a.settle()
    b.backend.contexts = a.backend.contexts  # one compute, seen from both
    b.backend.query_result = result_bytes
    b.backend.query_outcome = QueryOutcome(ok=True, rows=3, result_bytes=len(result_bytes))
    lf = pl.LazyFrame({"a": [1, 2, 3]})
    sub = build_submission(lf, "collect", None)
    submitted = await a.client.post(
        f"/v1/leases/{lease['id']}/queries",
        files={"plan": ("plan.bin", sub.plan)},
        data={"options": json.dumps(sub.options)},
        headers=a.headers,
    )
    assert submitted.status_code == 202, submitted.text
    query_id = submitted.json()["id"]
    assert not list((tmp_path / "a").rglob("*.plan"))  # nothing on A's disk

    # B's runner runs it: the plan comes from the shared storage, the result goes there.
    await b.service.runner.tick()
    await b.service.runner.drain()
    [spec] = b.backend.executed
    assert spec.plan == sub.plan
    done = await a.client.get(f"/v1/queries/{query_id}", headers=a.headers)
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "succeeded", done.json()

    # Read through A, which neither ran it nor has it on disk.
    result = await a.client.get(f"/v1/queries/{query_id}/result", headers=a.headers)
    assert result.status_code == 200, result.text
    assert result.content == result_bytes
    assert result.headers["content-length"] == str(len(result_bytes))
    assert result.headers["content-type"] == "application/vnd.apache.arrow.file"
    assert not list((tmp_path / "a").rglob("*.arrow"))
    assert not list((tmp_path / "b").rglob("*.arrow"))  # B's scratch file was moved away
    assert b.service.spool.plan_ids() == []  # the plan is gone once it ran
    assert b.service.spool.result_ids() == [query_id]


async def test_a_result_too_big_for_the_database_fails_its_query_clearly(
    make_harness: Any, tmp_path: Path
) -> None:
    storage = {"kind": "database", "max_database_blob_bytes": 4096}
    h: Harness = await make_harness(storage=storage)
    h.backend.query_result = b"x" * 8192
    lease = await h.lease()
    await h.settle()
    sub = build_submission(pl.LazyFrame({"a": [1]}), "collect", None)
    submitted = await h.client.post(
        f"/v1/leases/{lease['id']}/queries",
        files={"plan": ("plan.bin", sub.plan)},
        data={"options": json.dumps(sub.options)},
        headers=h.headers,
    )
    assert submitted.status_code == 202, submitted.text
    await h.tick()
    await h.service.runner.drain()
    done = await h.client.get(f"/v1/queries/{submitted.json()['id']}", headers=h.headers)
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "failed"
    assert done.json()["error"]["type"] == "ResultTooLarge"
    assert "max_database_blob_bytes" in done.json()["error"]["message"]
    assert h.service.spool.result_ids() == []

    # A plan too big for it is refused when it is submitted, saying what to do.
    big = build_submission(pl.LazyFrame({"a": list(range(2000))}), "collect", None)
    refused = await h.client.post(
        f"/v1/leases/{lease['id']}/queries",
        files={"plan": ("plan.bin", big.plan)},
        data={"options": json.dumps(big.options)},
        headers=h.headers,
    )
    assert refused.status_code == 413, refused.text
    assert "max_database_blob_bytes" in refused.json()["error"]["message"]
