"""The listener's background releaser, in-process: bounded, never blocking, coalescing,
and alive after a failing release. Its real use (in the scheduler, the API server and
task processes) is tested on a real deployment in ``test_airflow_deployment.py``."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

# Airflow reads its home when first imported; keep it out of the user's.
os.environ.setdefault("AIRFLOW_HOME", str(Path(__file__).parent / ".airflow-home"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from airflow_plugin.releases import BackgroundReleaser, ReleaseRequest


class SlowPclease:
    """A release that waits until the test lets it go, and records what it was asked."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.started = threading.Event()
        self.released: list[ReleaseRequest] = []

    def __call__(self, request: ReleaseRequest) -> None:
        self.started.set()
        assert self.go.wait(30)
        if request.run_id == "broken":
            raise RuntimeError("pclease answered nonsense")
        self.released.append(request)


def request(run_id: str, task_id: str | None = None) -> ReleaseRequest:
    return ReleaseRequest("pclease_default", "etl", run_id, task_id, why="test")


@pytest.fixture
def pclease() -> SlowPclease:
    return SlowPclease()


def test_a_full_queue_drops_instead_of_blocking(pclease: SlowPclease) -> None:
    releaser = BackgroundReleaser(maxsize=2, release=pclease)
    assert releaser.submit(request("r0"))
    assert pclease.started.wait(10)  # r0 is being released, and hangs
    assert releaser.submit(request("r1"))
    assert releaser.submit(request("r2"))
    assert not releaser.submit(request("r3"))  # the queue holds two: dropped, at once
    assert releaser.dropped == 1
    assert not releaser.drain(0.0)
    pclease.go.set()
    assert releaser.drain(30)
    assert [r.run_id for r in pclease.released] == ["r0", "r1", "r2"]


def test_the_same_release_waits_only_once(pclease: SlowPclease) -> None:
    releaser = BackgroundReleaser(maxsize=8, release=pclease)
    releaser.submit(request("r0"))
    assert pclease.started.wait(10)
    for _ in range(3):
        assert releaser.submit(request("r1", "load"))
    releaser.submit(request("r1"))
    pclease.go.set()
    assert releaser.drain(30)
    assert [(r.run_id, r.task_id) for r in pclease.released] == [
        ("r0", None),
        ("r1", "load"),
        ("r1", None),
    ]


def test_a_failing_release_is_logged_and_the_worker_goes_on(
    pclease: SlowPclease, caplog: pytest.LogCaptureFixture
) -> None:
    releaser = BackgroundReleaser(maxsize=8, release=pclease)
    pclease.go.set()
    releaser.submit(request("broken"))
    releaser.submit(request("r1"))
    assert releaser.drain(30)
    assert [r.run_id for r in pclease.released] == ["r1"]
    assert "releasing the leases of etl/broken failed" in caplog.text
    assert releaser.done == 2
