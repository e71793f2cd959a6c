"""DAGs for the deferrable operators on a real Airflow deployment with a triggerer:
``pclease_deferred_slot`` (a task deferring while its context boots gives its slot of a
one-slot pool to another task), and long queries run by deferred tasks that the tests
restart the triggerer under, revoke the lease of, or mark failed. ``PCLEASE_TEST_DIR`` is
where tasks and the tests exchange small files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import polars as pl
from airflow.sdk import dag, task

from airflow_plugin.operators import PcleaseOperator

EXCHANGE = Path(os.environ.get("PCLEASE_TEST_DIR", "."))
#: The pool of one slot the slot test runs in (the test creates it).
ONE_SLOT = "pclease_one_slot"


def cross_join(n: int) -> pl.LazyFrame:
    """A streaming cross join of n² rows: seconds to minutes of one CPU, little memory."""
    a = pl.LazyFrame().select(x=pl.int_range(0, int(n)))
    joined = a.join(a.select(y=pl.col("x")), how="cross")
    return joined.filter((pl.col("x") * 7 + pl.col("y")) % 13 == 0).select(pl.len())


def small_frame() -> pl.LazyFrame:
    return pl.LazyFrame({"n": [1, 2, 3]}).select(pl.col("n").sum())


def tell(name: str, **values: Any) -> None:
    path = EXCHANGE / f"{name}.json"
    path.with_suffix(".tmp").write_text(json.dumps(values))
    path.with_suffix(".tmp").rename(path)


@dag(schedule=None, catchup=False)
def pclease_deferred_slot() -> None:
    # Scheduled first (higher priority), it takes the pool's one slot, then defers while
    # the "slow" profile's context boots: the slot is free for in_the_slot meanwhile.
    PcleaseOperator(
        task_id="deferred",
        profile="slow",
        build=small_frame,
        sink="collect",
        deferrable=True,
        pool=ONE_SLOT,
        priority_weight=10,
    )

    @task(pool=ONE_SLOT, priority_weight=1)
    def in_the_slot() -> None:
        started = time.time()
        time.sleep(1)
        tell("in_the_slot", started=started, ended=time.time())

    in_the_slot()


def long_query_dag(dag_id: str, n: int) -> Any:
    @dag(dag_id=dag_id, schedule=None, catchup=False)
    def long_query() -> None:
        # A TTL that outlasts a triggerer restart (the service's default here is 20 s).
        PcleaseOperator(
            task_id="long_query",
            profile="shared",
            build=cross_join,
            op_args=[n],
            sink="collect",
            deferrable=True,
            ttl_s=90,
        )

    return long_query()


# Tens of seconds of CPU (40,000 ended in 3 s on an idle machine, before the triggerer
# held the lease): the query outlasts the triggerer's restart and ends on its own.
triggerer_restarted = long_query_dag("pclease_deferred_restart", 150_000)
# Minutes of CPU: it ends only when the test ends its lease or kills its task.
revoked = long_query_dag("pclease_deferred_revoked", 200_000)
killed = long_query_dag("pclease_deferred_killed", 200_000)
slot = pclease_deferred_slot()
