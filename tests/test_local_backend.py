"""LocalBackend with real worker processes: no mocks, every process stopped at teardown."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pclease_service.backends.base import (
    LABEL_CONTEXT_ID,
    BackendError,
    ContextSpec,
    Handle,
    Phase,
    QueryOutcome,
    QuerySpec,
    QueryTarget,
)
from pclease_service.backends.local import LocalBackend

SMALL_PLAN = pl.LazyFrame({"a": [1, 2, 3]}).with_columns(b=pl.col("a") * 2)


def spec(context_id: str, **options: Any) -> ContextSpec:
    return ContextSpec(
        context_id=context_id,
        profile="small",
        cpus=1,
        memory_gb=0.5,
        labels={LABEL_CONTEXT_ID: context_id},
        options=options,
    )


def process_exists(pid: int) -> bool:
    """True for a live process; a zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def dir_exists(handle: Handle) -> bool:
    return Path(handle["dir"]).exists()


def environment_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def wait_until_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_exists(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class Workers:
    """Starts workers in a short state dir and stops every one of them at teardown."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.started: list[tuple[LocalBackend, Handle]] = []

    def backend(self, **kwargs: Any) -> LocalBackend:
        return LocalBackend(self.state_dir, **kwargs)

    async def start(self, backend: LocalBackend, context_spec: ContextSpec) -> Handle:
        handle = await backend.start(context_spec)
        self.started.append((backend, handle))
        return handle

    async def start_running(self, backend: LocalBackend, context_spec: ContextSpec) -> Handle:
        handle = await self.start(backend, context_spec)
        await wait_for_phase(backend, handle, Phase.RUNNING)
        return handle

    async def stop_all(self) -> None:
        for backend, handle in self.started:
            await backend.stop(handle)
            assert not process_exists(int(handle["pid"]))


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Not tmp_path: AF_UNIX socket paths must stay under 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="pcl-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def workers(state_dir: Path) -> AsyncIterator[Workers]:
    started = Workers(state_dir)
    yield started
    await started.stop_all()


async def wait_for_phase(
    backend: LocalBackend, handle: Handle, phase: Phase, timeout_s: float = 10.0
) -> list[tuple[float, Phase]]:
    """Poll status until ``phase``; return every (elapsed, phase) seen on the way."""
    t0 = time.monotonic()
    seen: list[tuple[float, Phase]] = []
    while True:
        observation = await backend.status(handle)
        seen.append((time.monotonic() - t0, observation.phase))
        if observation.phase is phase:
            return seen
        assert time.monotonic() - t0 < timeout_s, f"never reached {phase}: {seen[-3:]}"
        await asyncio.sleep(0.05)


async def collect(
    backend: LocalBackend, handle: Handle, plan: bytes, result_path: Path
) -> QueryOutcome:
    spec = QuerySpec(
        query_id="q",
        plan=plan,
        target=QueryTarget.COLLECT,
        result_path=str(result_path),
        timeout_s=30,
    )
    return await backend.execute(handle, spec)


async def wait_for_executor(backend: LocalBackend, handle: Handle) -> int:
    deadline = time.monotonic() + 10
    while (pid := (await backend.ping(handle))["executor_pid"]) is None:
        assert time.monotonic() < deadline, "the executor never started"
        await asyncio.sleep(0.05)
    return int(pid)


async def test_start_returns_at_once_then_starting_then_running(workers: Workers) -> None:
    backend = workers.backend()
    t0 = time.monotonic()
    handle = await workers.start(backend, spec("ctx-boot"))
    assert time.monotonic() - t0 < 1.0
    assert set(handle) == {"pid", "proc_start", "dir"}
    assert "key" not in str(handle).lower()

    seen = await wait_for_phase(backend, handle, Phase.RUNNING)

    assert seen[0][1] is Phase.STARTING
    ping = await backend.ping(handle)
    assert ping["ok"] is True
    assert ping["pid"] == handle["pid"]
    assert ping["threads"] == 1
    assert ping["memory_gb"] == 0.5
    assert ping["polars_version"] == pl.__version__


async def test_boot_delay_keeps_the_worker_starting(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start(backend, spec("ctx-slow", boot_delay_s=2.0))

    seen = await wait_for_phase(backend, handle, Phase.RUNNING)

    assert all(phase is Phase.STARTING for elapsed, phase in seen if elapsed < 2.0)
    assert seen[-1][0] >= 2.0


async def test_a_killed_worker_is_failed_with_the_signal(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-kill"))
    executor_pid = await wait_for_executor(backend, handle)

    os.kill(int(handle["pid"]), signal.SIGKILL)
    await asyncio.to_thread(wait_until_gone, int(handle["pid"]), 5)
    observation = await backend.status(handle)

    assert observation.phase is Phase.FAILED
    assert observation.message == "worker process exited with signal 9 (SIGKILL)"
    # The executor notices its worker is gone and exits by itself.
    assert await asyncio.to_thread(wait_until_gone, executor_pid, 5)


async def test_stop_is_idempotent_and_leaves_no_process_or_directory(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-stop"))
    executor_pid = await wait_for_executor(backend, handle)

    t0 = time.monotonic()
    await backend.stop(handle)
    assert time.monotonic() - t0 < 3.0, "the polite stop should not need signals"
    await backend.stop(handle)

    assert not process_exists(int(handle["pid"]))
    assert await asyncio.to_thread(wait_until_gone, executor_pid, 2)
    assert not dir_exists(handle)
    assert (await backend.status(handle)).phase is Phase.STOPPED
    assert await backend.list() == []
    with pytest.raises(BackendError, match="is not running"):
        await collect(backend, handle, SMALL_PLAN.serialize(), workers.state_dir / "r.arrow")


async def test_stopping_a_booting_worker_does_not_wait_for_it(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start(backend, spec("ctx-early", boot_delay_s=30.0))
    await asyncio.sleep(0.5)  # let it install its signal handler

    t0 = time.monotonic()
    await backend.stop(handle)

    assert time.monotonic() - t0 < 3.0
    assert not process_exists(int(handle["pid"]))
    assert not dir_exists(handle)


async def test_a_hung_worker_and_its_executor_are_killed(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-hung"))
    executor_pid = await wait_for_executor(backend, handle)
    os.kill(int(handle["pid"]), signal.SIGSTOP)

    await backend.stop(handle)  # no answer, SIGTERM stays pending, then SIGKILL

    assert not process_exists(int(handle["pid"]))
    assert await asyncio.to_thread(wait_until_gone, executor_pid, 2)
    assert not dir_exists(handle)


async def test_a_new_instance_lists_polls_and_stops_earlier_workers(workers: Workers) -> None:
    first = workers.backend()
    handles = {cid: await workers.start(first, spec(cid)) for cid in ("ctx-a", "ctx-b")}
    for handle in handles.values():
        await wait_for_phase(first, handle, Phase.RUNNING)

    listed = await first.list()
    assert {o.context_id: dict(o.handle) for o in listed} == handles
    assert {o.phase for o in listed} == {Phase.RUNNING}

    restarted = workers.backend()  # as if the service had restarted
    relisted = await restarted.list()
    assert {o.context_id for o in relisted} == {"ctx-a", "ctx-b"}
    for observed in relisted:
        assert (await restarted.status(observed.handle)).phase is Phase.RUNNING
        await restarted.stop(observed.handle)
        assert not process_exists(int(observed.handle["pid"]))
        assert not dir_exists(observed.handle)
    assert await restarted.list() == []


async def test_list_forgets_dead_workers_and_cleans_their_directories(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-dead"))
    os.kill(int(handle["pid"]), signal.SIGKILL)
    await asyncio.to_thread(wait_until_gone, int(handle["pid"]), 5)

    assert await backend.list() == []
    assert not dir_exists(handle)


async def test_an_unpinged_worker_exits_by_its_orphan_timeout(workers: Workers) -> None:
    backend = workers.backend(orphan_timeout_s=1.5)
    handle = await workers.start_running(backend, spec("ctx-orphan"))
    last_contact = time.monotonic()

    assert await asyncio.to_thread(wait_until_gone, int(handle["pid"]), 6)

    assert time.monotonic() - last_contact >= 1.5
    observation = await backend.status(handle)
    assert observation.phase is Phase.FAILED
    assert observation.message is not None
    assert "orphan timeout" in observation.message


async def test_workers_and_executors_get_none_of_the_service_environment(
    workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLARS_CLOUD_CLIENT_SECRET", "s3cr3t-value")
    monkeypatch.setenv("PCLEASE_X", "pclease-setting-value")
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-env"))
    executor_pid = await wait_for_executor(backend, handle)

    for pid in (int(handle["pid"]), executor_pid):
        environ = environment_of(pid)
        names = {entry.split(b"=", 1)[0] for entry in environ.split(b"\0") if entry}
        assert b"s3cr3t-value" not in environ
        assert b"pclease-setting-value" not in environ
        assert not any(name.startswith(b"PCLEASE_") for name in names)
        assert b"POLARS_MAX_THREADS=1" in environ.split(b"\0")
        assert names <= {
            b"PATH",
            b"HOME",
            b"TMPDIR",
            b"LANG",
            b"PYTHONPATH",
            b"POLARS_MAX_THREADS",
            b"_RJEM_MALLOC_CONF",  # Polars sets it when the worker imports it
        } | {n for n in names if n.startswith(b"LC_")}


async def test_the_authkey_is_private(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start(backend, spec("ctx-key"))
    key_path = Path(handle["dir"]) / "authkey"

    assert key_path.stat().st_mode & 0o777 == 0o600
    key = key_path.read_bytes()
    await wait_for_phase(backend, handle, Phase.RUNNING)
    assert key.hex() not in (Path(handle["dir"]) / "worker.log").read_text()


async def test_a_plan_without_a_sink_is_collected(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-run"))
    result = workers.state_dir / "result.arrow"

    outcome = await collect(backend, handle, SMALL_PLAN.serialize(), result)

    assert outcome == QueryOutcome(
        ok=True, rows=3, result_bytes=result.stat().st_size, output=str(result)
    )
    frame = pl.read_ipc(result)
    assert frame.to_dict(as_series=False) == {"a": [1, 2, 3], "b": [2, 4, 6]}


async def test_a_query_beyond_memory_gb_fails_clearly_and_the_worker_lives_on(
    workers: Workers,
) -> None:
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-mem"))
    huge = pl.LazyFrame().select(pl.int_range(0, 500_000_000).alias("x"))  # 4 GB of int64
    result = workers.state_dir / "result.arrow"

    outcome = await collect(backend, handle, huge.serialize(), result)

    assert outcome.error_type == "MemoryLimitExceeded"
    assert outcome.error_message == (
        "query exceeded the profile's memory limit of 0.5 GB (memory_gb); "
        "use a larger profile or sink instead of collect"
    )
    assert not result.exists()
    assert (await backend.ping(handle))["ok"] is True
    outcome = await collect(backend, handle, SMALL_PLAN.serialize(), result)
    assert outcome.rows == 3


async def test_a_malformed_plan_is_an_error_not_a_dead_worker(workers: Workers) -> None:
    backend = workers.backend()
    handle = await workers.start_running(backend, spec("ctx-junk"))

    result = workers.state_dir / "result.arrow"

    outcome = await collect(backend, handle, os.urandom(4096), result)

    assert outcome.error_type == "PlanInvalid"
    assert (await backend.status(handle)).phase is Phase.RUNNING
    outcome = await collect(backend, handle, SMALL_PLAN.serialize(), result)
    assert outcome.rows == 3


async def test_a_python_that_cannot_be_spawned_is_a_backend_error(workers: Workers) -> None:
    backend = workers.backend(python="/nonexistent/bin/python3")

    with pytest.raises(BackendError, match="could not launch a local worker"):
        await backend.start(spec("ctx-nopython"))

    assert not (workers.state_dir / "workers" / "ctx-nopython").exists()


async def test_a_worker_that_crashes_at_boot_is_failed_with_its_last_words(
    workers: Workers,
) -> None:
    # Without site-packages (`python -S`) the worker cannot import polars and exits with 1.
    script = workers.state_dir / "python-no-site"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    script.chmod(0o700)
    backend = workers.backend(python=str(script))
    handle = await workers.start(backend, spec("ctx-crash"))

    await wait_for_phase(backend, handle, Phase.FAILED)
    message = (await backend.status(handle)).message

    assert message is not None
    assert message.startswith("worker process exited with code 1; last log line:")
    assert "ModuleNotFoundError" in message


async def test_status_of_a_vanished_or_reused_pid_is_failed_not_an_error(
    workers: Workers,
) -> None:
    backend = workers.backend()
    directory = workers.state_dir / "workers" / "ctx-ghost"
    directory.mkdir(parents=True)
    # Our own pid with another start time: what a handle looks like once its pid is reused.
    reused = {"pid": os.getpid(), "proc_start": 1, "dir": str(directory)}

    observation = await backend.status(reused)
    await backend.stop(reused)  # must not signal this test process

    assert observation.phase is Phase.FAILED
    assert observation.message == "worker process is gone"
    assert not directory.exists()
    with pytest.raises(BackendError, match="outside this backend"):
        await backend.status({"pid": 1, "proc_start": 1, "dir": "/etc"})
