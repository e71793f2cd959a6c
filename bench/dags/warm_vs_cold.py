"""Versions of the example pipeline for bench/airflow_bench.py: ``bench_cold`` leases
``large`` only when the join starts; ``bench_warm`` pre-starts it with a setup task that
waits for the context to run; ``bench_warm_nowait`` with one that does not wait."""

from __future__ import annotations

import os
from typing import Any

import polars as pl
from airflow.sdk import dag, task

from airflow_plugin.operators import warm_profile

LAKE = os.environ["PCLEASE_DEMO_LAKE"]


def pipeline(warm: bool, wait: bool = True) -> None:
    @task.pclease(profile="small")
    def prepare_dataset_1(lease: Any) -> str:
        out = f"{LAKE}/customers.parquet"
        lf = pl.LazyFrame({"customer_id": range(200), "country": ["nl", "de"] * 100})
        lease.remote(lf).sink_parquet(out)
        return out

    @task.pclease(profile="small")
    def prepare_dataset_2(lease: Any) -> str:
        out = f"{LAKE}/orders.parquet"
        lf = pl.LazyFrame({"customer_id": [i % 200 for i in range(5000)], "amount": 1.5})
        lease.remote(lf).sink_parquet(out)
        return out

    @task.pclease(profile="large")
    def join_datasets(lease: Any, customers: str, orders: str) -> int:
        joined = pl.scan_parquet(orders).join(pl.scan_parquet(customers), on="customer_id")
        return int(lease.remote(joined.group_by("country").len()).collect().height)

    customers, orders = prepare_dataset_1(), prepare_dataset_2()
    if warm:
        setup, teardown = warm_profile("large", wait_for_context=wait)
        with teardown.as_teardown(setups=setup):
            join_datasets(customers, orders)
    else:
        join_datasets(customers, orders)


@dag(schedule=None, catchup=False)
def bench_warm() -> None:
    pipeline(warm=True)


@dag(schedule=None, catchup=False)
def bench_warm_nowait() -> None:
    pipeline(warm=True, wait=False)


@dag(schedule=None, catchup=False)
def bench_cold() -> None:
    pipeline(warm=False)


warm = bench_warm()
warm_nowait = bench_warm_nowait()
cold = bench_cold()
