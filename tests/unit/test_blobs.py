"""The storages of plans and results: one contract, three implementations (a directory,
the service database on SQLite and PostgreSQL, and S3 as moto's real HTTP server)."""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from pclease_service.blobs import BlobNotFound, BlobStore, create_blob_store
from pclease_service.blobs.base import CHUNK_BYTES
from pclease_service.blobs.local import LocalBlobs
from pclease_service.blobs.s3 import S3Blobs
from pclease_service.clock import SystemClock
from pclease_service.config import ConfigError, Settings, load_settings
from pclease_service.db.engine import create_db_engine
from pclease_service.db.migrate import upgrade
from pclease_service.db.session import Database
from pclease_service.errors import PayloadTooLarge, StorageUnavailable
from pclease_service.queries.spool import Spool
from tests.harness import truncate
from tests.moto import moto_server


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def new_bucket(moto_url: str) -> str:
    bucket = f"pclease-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return bucket


def database_on(url: str) -> Database:
    upgrade(url)
    return Database(create_db_engine(url), SystemClock())


@pytest.fixture(
    params=[
        "local",
        "database-sqlite",
        pytest.param("database-postgres", marks=pytest.mark.postgres),
        "s3",
    ]
)
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    kind = request.param.split("-")[0]
    storage: dict[str, Any] = {"kind": kind}
    if request.param == "database-postgres":
        url: str = request.getfixturevalue("pg_database")
        truncate(url)
    else:
        url = f"sqlite:///{tmp_path / 'pclease.db'}"
    db = database_on(url)
    if kind == "s3":
        request.getfixturevalue("aws_env")
        moto_url = request.getfixturevalue("moto_url")
        storage |= {"url": f"s3://{new_bucket(moto_url)}/pclease/", "endpoint_url": moto_url}
    settings = Settings(data_dir=tmp_path / "data", storage=storage, profiles={})
    store = create_blob_store(settings, db, SystemClock())
    assert store.kind == kind
    store.prepare()
    yield store
    db.engine.dispose()


def test_the_blob_contract(blobs: BlobStore, tmp_path: Path) -> None:
    big = os.urandom(CHUNK_BYTES * 2 + 17)
    blobs.put("plans/a.plan", b"plan a")
    blobs.put("results/b.arrow", big)
    assert blobs.read("plans/a.plan") == b"plan a"
    readable = blobs.open("results/b.arrow")
    assert readable.size == len(big)
    chunks = list(readable.chunks)
    assert b"".join(chunks) == big
    assert len(chunks) >= 3  # read piece by piece, never whole
    assert max(len(c) for c in chunks) <= CHUNK_BYTES
    blobs.put("plans/a.plan", b"replaced")
    assert blobs.read("plans/a.plan") == b"replaced"
    assert blobs.keys("plans/") == ["plans/a.plan"]
    assert blobs.keys("results/") == ["results/b.arrow"]
    assert blobs.keys("") == ["plans/a.plan", "results/b.arrow"]

    scratch = tmp_path / "scratch.arrow"
    scratch.write_bytes(b"written by a backend")
    blobs.put_file("results/c.arrow", scratch)
    assert blobs.read("results/c.arrow") == b"written by a backend"

    blobs.delete("plans/a.plan")
    blobs.delete("plans/a.plan")  # idempotent
    with pytest.raises(BlobNotFound):
        blobs.read("plans/a.plan")
    with pytest.raises(BlobNotFound):
        blobs.open("plans/never")
    assert blobs.keys("plans/") == []
    with pytest.raises(ValueError, match="not a blob key"):
        blobs.put("../escape", b"x")


def test_local_blobs_are_private_files(tmp_path: Path) -> None:
    blobs = LocalBlobs(tmp_path / "spool")
    blobs.prepare()
    blobs.put("plans/a.plan", b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "spool" / "plans" / "a.plan").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
    # A backend on this machine writes results in place: nothing to copy.
    assert blobs.local_path("results/q.arrow") == tmp_path / "spool" / "results" / "q.arrow"


def test_database_blobs_refuse_what_is_too_big(tmp_path: Path) -> None:
    database = database_on(f"sqlite:///{tmp_path / 'pclease.db'}")
    settings = Settings(
        data_dir=tmp_path,
        storage={"kind": "database", "max_database_blob_bytes": 1024},
        profiles={},
    )
    blobs = create_blob_store(settings, database, SystemClock())
    with pytest.raises(PayloadTooLarge, match="max_database_blob_bytes"):
        blobs.put("plans/big.plan", b"x" * 1025)


def test_an_unreachable_storage_is_a_clear_503(aws_env: None, tmp_path: Path) -> None:
    blobs = S3Blobs("s3://nowhere/p/", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    spool = Spool(blobs, tmp_path / "scratch")
    with pytest.raises(StorageUnavailable, match="s3 storage"):
        spool.write_plan("q1", b"plan")
    with pytest.raises(StorageUnavailable):
        spool.read_plan("q1")


@pytest.mark.parametrize(
    ("storage", "problem"),
    [
        ({"kind": "s3"}, 'storage.kind = "s3" needs url'),
        ({"kind": "s3", "url": "https://bucket"}, 'needs url = "s3://bucket/prefix/"'),
        ({"kind": "local", "url": "s3://b/p"}, 'are for kind = "s3"'),
        ({"kind": "database", "directory": "/srv/spool"}, 'is for kind = "local"'),
        ({"kind": "local", "directory": "spool"}, "must be an absolute path"),
        ({"kind": "s3", "url": "s3://b1/p", "endpoint_url": "minio:9000"}, "http:// or https://"),
        ({"kind": "ftp"}, "storage.kind"),
    ],
)
def test_incomplete_storage_settings_are_refused(
    storage: dict[str, Any], problem: str, tmp_path: Path
) -> None:
    lines = ["[storage]"] + [f'{key} = "{value}"' for key, value in storage.items()]
    config = tmp_path / "pclease.toml"
    config.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert problem in str(refused.value)
