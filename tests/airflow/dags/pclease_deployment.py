"""DAGs for the provider's tests on a real Airflow deployment: every way a task can end
must end its lease too. ``PCLEASE_TEST_DIR`` is where tasks and the tests exchange small
files (lease ids, process ids)."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
from airflow.sdk import dag, task

from airflow_plugin.hooks import PcleaseHook, task_holder
from airflow_plugin.operators import PcleaseOperator, PcleaseReleaseLeaseOperator, warm_profile

EXCHANGE = Path(os.environ.get("PCLEASE_TEST_DIR", "."))
PARALLEL_TASKS = 6


def slow_query() -> pl.LazyFrame:
    """A streaming cross join of 10^10 rows: minutes of one CPU, megabytes of memory."""
    a = pl.LazyFrame().select(x=pl.int_range(0, 100_000))
    joined = a.join(a.select(y=pl.col("x")), how="cross")
    return joined.filter((pl.col("x") * 7 + pl.col("y")) % 13 == 0).select(pl.len())


def tell(name: str, **values: Any) -> None:
    """Leave ``values`` for the test, as ``name``.json in the exchange directory."""
    path = EXCHANGE / f"{name}.json"
    path.with_suffix(".tmp").write_text(json.dumps(values))
    path.with_suffix(".tmp").rename(path)


@dag(schedule=None, catchup=False)
def pclease_parallel() -> None:
    """Six tasks lease one profile at once: they must share one context."""

    @task.pclease(profile="shared")
    def share(lease: Any, n: int) -> int:
        hook = PcleaseHook()
        seen = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            lease.remote(pl.LazyFrame({"n": [n]})).collect()
            seen = max(seen, hook.get_conn().get_context(lease.context_id).refcount)
            if seen >= 2:
                break
            time.sleep(0.2)
        hook.close()
        return seen

    share.expand(n=list(range(PARALLEL_TASKS)))


@dag(schedule=None, catchup=False)
def pclease_killed() -> None:
    @task.pclease(profile="small")
    def killed(lease: Any) -> None:
        tell("killed", lease_id=lease.id, pid=os.getpid())
        time.sleep(300)

    killed()


@dag(schedule=None, catchup=False)
def pclease_marked_failed() -> None:
    @task.pclease(profile="small")
    def long_query(lease: Any) -> None:
        tell("marked_failed", lease_id=lease.id, pid=os.getpid())
        lease.remote(slow_query()).collect()

    long_query()


@dag(schedule=None, catchup=False)
def pclease_lease_lost() -> None:
    @task.pclease(profile="small")
    def revoked_mid_query(lease: Any) -> None:
        tell("lease_lost", lease_id=lease.id)
        lease.remote(slow_query()).collect()
        raise AssertionError("the lease was never lost")

    revoked_mid_query()


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
        # What the supervisor does to a task it stops: SIGTERM, whose handler calls
        # on_kill (the supervisor would follow with SIGKILL; this task looks first).
        os.kill(os.getpid(), signal.SIGTERM)
        return PcleaseHook().get_conn().get_lease(lease.id).state.value

    terminated()


@dag(schedule=None, catchup=False)
def pclease_execution_timeout() -> None:
    @task.pclease(profile="small", execution_timeout=timedelta(seconds=2))
    def too_slow(lease: Any) -> None:
        tell("timeout", lease_id=lease.id)
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


def leaking_dag(conn_id: str) -> Any:
    """Leases the task processes never release, taken through ``conn_id``: the listener
    must release them, through the same connection, wherever Airflow keeps it."""

    @dag(dag_id=f"pclease_leaks_via_{conn_id}", schedule=None, catchup=False)
    def leaks() -> None:
        @task.pclease(profile="small", pclease_conn_id=conn_id)
        def uses_pclease(lease: Any) -> None:
            """Makes this a pclease DAG: the DAG-run listener only looks at those."""

        @task
        def leak_and_fail() -> None:
            PcleaseHook(conn_id).get_conn().create_lease("small", holder=task_holder(), ttl_s=600)
            raise RuntimeError("failed without releasing its lease")

        @task
        def leak_and_succeed() -> None:
            PcleaseHook(conn_id).get_conn().create_lease("small", holder=task_holder(), ttl_s=600)

        uses_pclease() >> [leak_and_fail(), leak_and_succeed()]

    return leaks()


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


@dag(schedule=None, catchup=False)
def pclease_unreachable() -> None:
    """A pclease DAG whose connection leads nowhere: its run's end is released through
    that connection, and no task of it needs pclease to succeed."""
    PcleaseReleaseLeaseOperator(
        task_id="nothing_to_release", lease_id="", pclease_conn_id="pclease_blackhole"
    )


@dag(schedule=None, catchup=False)
def plain_dag() -> None:
    """No pclease at all: what the scheduler must keep running without delay."""

    @task
    def hello() -> str:
        return "hello"

    hello()


parallel = pclease_parallel()
killed = pclease_killed()
marked_failed = pclease_marked_failed()
lease_lost = pclease_lease_lost()
raises_mid_lease = pclease_raises_mid_lease()
sigterm = pclease_sigterm()
execution_timeout = pclease_execution_timeout()
teardown_after_failure = pclease_teardown_after_failure()
leaks_via_metastore = leaking_dag("pclease_default")
leaks_via_env = leaking_dag("pclease_env")
leaks_via_secrets = leaking_dag("pclease_secrets")
classic_operator = pclease_classic_operator()
unreachable = pclease_unreachable()
plain = plain_dag()
