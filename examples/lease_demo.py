"""Drive a lease through its whole life against a running pclease service.

    python examples/lease_demo.py --url http://127.0.0.1:8040 --token pcl_...

Leases profile "small" twice (the second lease shares the first one's context), runs Polars
queries through the lease (a CSV turned into Parquet on the context, then an aggregate
collected back), heartbeats, releases both, and watches the idle grace period stop the
context.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polars as pl

from pclease_client import ContextInfo, ContextState, LeaseInfo, LeaseState, PcleaseClient

# The data root examples/pclease.toml allows: absolute, and the same on every machine.
LAKE = Path("/tmp/pclease-demo-lake")  # noqa: S108


def show(what: str, obj: LeaseInfo | ContextInfo) -> None:
    keys = ("id", "state", "context_id", "refcount", "expires_at", "stops_at", "stop_reason")
    shown = {key: getattr(obj, key, None) for key in keys}
    print(f"  {what}: " + ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8040")
    parser.add_argument("--token", required=True)
    parser.add_argument("--profile", default="small")
    args = parser.parse_args()

    client = PcleaseClient(args.url, args.token, timeout_s=60)
    holder = {
        "dag_id": "demo",
        "run_id": f"manual__{int(time.time())}",
        "task_id": "lease_demo",
        "try_number": 1,
        "map_index": -1,
    }

    print(f"1. lease profile {args.profile!r} (cold: its context has to start)")
    first = client.create_lease(args.profile, holder=holder, ttl_s=15)
    show("lease", first)
    started = time.monotonic()
    first = client.get_lease(first.id, wait_s=30, while_state=LeaseState.PENDING)
    show(f"after {time.monotonic() - started:.1f} s", first)
    if first.state is not LeaseState.ACTIVE:
        raise SystemExit(f"the lease did not become active: {first}")

    print("2. a second lease on the same profile shares the running context")
    second = client.create_lease(args.profile, holder={**holder, "task_id": "second"})
    show("lease", second)
    context = client.get_context(first.context_id)
    show("context", context)
    assert second.context_id == first.context_id

    print("3. run Polars queries through the lease (the worker runs them, not this process)")
    LAKE.mkdir(parents=True, exist_ok=True)
    orders = LAKE / "orders.csv"
    pl.DataFrame(
        {
            "order_id": list(range(1, 1001)),
            "city": [("Amsterdam", "Berlin", "Paris", "Rome")[i % 4] for i in range(1000)],
            "amount": [round(5 + (i * 37 % 100) * 0.75, 2) for i in range(1000)],
        }
    ).write_csv(orders)
    # A handle that runs queries on the lease; this script heartbeats and releases it.
    lease = client.attach(first)
    out = LAKE / "orders.parquet"
    sunk = lease.remote(pl.scan_csv(orders).filter(pl.col("amount") > 20)).sink_parquet(str(out))
    print(f"  sink_parquet: {sunk.rows} rows to {sunk.output} in {sunk.duration_s} s")
    totals = lease.remote(
        pl.scan_parquet(out).group_by("city").agg(pl.col("amount").sum().round(2)).sort("city")
    ).collect()
    print("  collect of the per-city totals:")
    for row in totals.iter_rows(named=True):
        print(f"    {row['city']:10} {row['amount']:>10.2f}")

    print("4. heartbeats keep a lease alive")
    for _ in range(2):
        time.sleep(first.heartbeat_interval_s / 4)
        show("heartbeat", client.heartbeat(first.id))

    print("5. release both; the last release starts the idle grace period")
    client.release(second.id)
    show("released", client.release(first.id))
    context = client.get_context(first.context_id)
    show("context", context)

    print("6. wait for the grace period to stop the context")
    deadline = time.monotonic() + 60
    while not context.state.is_terminal and time.monotonic() < deadline:
        time.sleep(0.5)
        context = client.get_context(first.context_id)
    show("context", context)
    if context.state is not ContextState.STOPPED:
        raise SystemExit(f"the context did not stop: {context}")

    print("7. its history")
    for event in reversed(client.list_events(context_id=context.id)):
        move = f"{event.from_state or '-'} -> {event.to_state}" if event.to_state else ""
        print(f"  {event.at:%H:%M:%S} {event.kind:7} {move:22} {event.reason}")
    print(f"done: context ran {context.cost_so_far:.5f} (cost units) worth of compute")
    client.close()


if __name__ == "__main__":
    main()
