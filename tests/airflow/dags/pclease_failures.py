"""DAGs that end badly, for the provider's tests: every way a task can end must end its
lease too. ``PCLEASE_TEST_DIR`` is where tasks and the test exchange small files."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
from airflow.sdk import dag, task

from airflow_plugin.hooks import PcleaseHook, task_holder
from airflow_plugin.operators import PcleaseOperator, warm_profile

EXCHANGE = Path(os.environ.get("PCLEASE_TEST_DIR", "."))


@dag(schedule=None, catchup=False)
def pclease_raises_mid_lease() -> None:
    @task.pclease(profile="small")
    def explode(lease: Any) -> None:
        lease.remote(pl.LazyFrame({"a": [1, 2, 3]})).collect()
        raise ValueError("the task broke while holding its lease")

    explode()


@dag(schedule=None, catchup=False)
def pclease_sigterm() -> None:
    @task.pclease(profile="small")
    def terminated(lease: Any) -> str:
        # What the supervisor does to a task marked failed in the UI: SIGTERM, on_kill.
        os.kill(os.getpid(), signal.SIGTERM)
        return str(PcleaseHook().get_conn().get_lease(lease.id)["state"])

    terminated()


@dag(schedule=None, catchup=False)
def pclease_execution_timeout() -> None:
    @task.pclease(profile="small", execution_timeout=timedelta(seconds=2))
    def too_slow(lease: Any) -> None:
        (EXCHANGE / "timeout.lease").write_text(lease.id)
        time.sleep(60)

    too_slow()


@dag(schedule=None, catchup=False)
def pclease_teardown_after_failure() -> None:
    @task
    def broken() -> None:
        raise RuntimeError("a task between setup and teardown failed")

    setup, teardown = warm_profile("small")
    with teardown.as_teardown(setups=setup):
        broken()


@dag(schedule=None, catchup=False)
def pclease_lease_lost() -> None:
    @task.pclease(profile="small")
    def keeps_working(lease: Any) -> None:
        (EXCHANGE / "lost.lease").write_text(lease.id)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lease.remote(pl.LazyFrame({"a": [1]})).collect()
            time.sleep(0.2)
        raise AssertionError("the lease was never lost")

    keeps_working()


@dag(schedule=None, catchup=False)
def pclease_listener_cleans_up() -> None:
    """Leases the task process itself never releases: the listener must."""

    @task.pclease(profile="small")
    def uses_pclease(lease: Any) -> None:
        """Makes this a pclease DAG: the DAG-run listener only looks at those."""

    @task
    def leak_and_fail() -> None:
        PcleaseHook().get_conn().create_lease("small", holder=task_holder(), ttl_s=600)
        raise RuntimeError("failed without releasing its lease")

    @task
    def leak_and_succeed() -> None:
        PcleaseHook().get_conn().create_lease("small", holder=task_holder(), ttl_s=600)

    uses_pclease() >> [leak_and_fail(), leak_and_succeed()]


@dag(schedule=None, catchup=False)
def pclease_classic_operator() -> None:
    def frame(n: int) -> pl.LazyFrame:
        return pl.LazyFrame({"n": list(range(int(n)))}).with_columns(square=pl.col("n") ** 2)

    PcleaseOperator(
        task_id="squares",
        profile="small",
        build=frame,
        op_kwargs={"n": "{{ params.n }}"},
        target=str(EXCHANGE / "{{ params.name }}.csv"),
        sink="csv",
        params={"n": 7, "name": "squares"},
    )
    PcleaseOperator(
        task_id="bad_column",
        profile="small",
        build=lambda: pl.LazyFrame({"a": [1]}).select("missing"),
        sink="collect",
    )


raises_mid_lease = pclease_raises_mid_lease()
sigterm = pclease_sigterm()
execution_timeout = pclease_execution_timeout()
teardown_after_failure = pclease_teardown_after_failure()
lease_lost = pclease_lease_lost()
listener_cleans_up = pclease_listener_cleans_up()
classic_operator = pclease_classic_operator()
