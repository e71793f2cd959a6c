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
from typing import Any

import httpx
import polars as pl

from pclease_client import PcleaseClient

# The data root examples/pclease.toml allows: absolute, and the same on every machine.
LAKE = Path("/tmp/pclease-demo-lake")  # noqa: S108


def show(what: str, obj: dict[str, Any]) -> None:
    keys = ("id", "state", "context_id", "refcount", "expires_at", "stops_at", "stop_reason")
    print(f"  {what}: " + ", ".join(f"{k}={obj[k]}" for k in keys if obj.get(k) is not None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8040")
    parser.add_argument("--token", required=True)
    parser.add_argument("--profile", default="small")
    args = parser.parse_args()

    client = httpx.Client(
        base_url=args.url, timeout=60, headers={"Authorization": f"Bearer {args.token}"}
    )
    holder = {
        "dag_id": "demo",
        "run_id": f"manual__{int(time.time())}",
        "task_id": "lease_demo",
        "try_number": 1,
        "map_index": -1,
    }

    print(f"1. lease profile {args.profile!r} (cold: its context has to start)")
    first = (
        client.post("/v1/leases", json={"profile": args.profile, "holder": holder, "ttl_s": 15})
        .raise_for_status()
        .json()
    )
    show("lease", first)
    started = time.monotonic()
    first = (
        client.get(f"/v1/leases/{first['id']}", params={"wait_s": 30, "state": "pending"})
        .raise_for_status()
        .json()
    )
    show(f"after {time.monotonic() - started:.1f} s", first)
    if first["state"] != "active":
        raise SystemExit(f"the lease did not become active: {first}")

    print("2. a second lease on the same profile shares the running context")
    second = client.post(
        "/v1/leases", json={"profile": args.profile, "holder": {**holder, "task_id": "second"}}
    )
    second_lease = second.raise_for_status().json()
    show("lease", second_lease)
    context = client.get(f"/v1/contexts/{first['context_id']}").raise_for_status().json()
    show("context", context)
    assert second_lease["context_id"] == first["context_id"]

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
    query_client = PcleaseClient(args.url, args.token)
    lease = query_client.attach(first)
    out = LAKE / "orders.parquet"
    sunk = lease.remote(pl.scan_csv(orders).filter(pl.col("amount") > 20)).sink_parquet(str(out))
    print(f"  sink_parquet: {sunk['rows']} rows to {sunk['output']} in {sunk['duration_s']} s")
    totals = lease.remote(
        pl.scan_parquet(out).group_by("city").agg(pl.col("amount").sum().round(2)).sort("city")
    ).collect()
    print("  collect of the per-city totals:")
    for row in totals.iter_rows(named=True):
        print(f"    {row['city']:10} {row['amount']:>10.2f}")
    query_client.close()

    print("4. heartbeats keep a lease alive")
    for _ in range(2):
        time.sleep(first["heartbeat_interval_s"] / 4)
        beat = client.post(f"/v1/leases/{first['id']}/heartbeat").raise_for_status().json()
        show("heartbeat", beat)

    print("5. release both; the last release starts the idle grace period")
    client.delete(f"/v1/leases/{second_lease['id']}").raise_for_status()
    released = client.delete(f"/v1/leases/{first['id']}").raise_for_status().json()
    show("released", released)
    context = client.get(f"/v1/contexts/{first['context_id']}").raise_for_status().json()
    show("context", context)

    print("6. wait for the grace period to stop the context")
    deadline = time.monotonic() + 60
    while context["state"] not in ("stopped", "failed") and time.monotonic() < deadline:
        time.sleep(0.5)
        context = client.get(f"/v1/contexts/{first['context_id']}").raise_for_status().json()
    show("context", context)
    if context["state"] != "stopped":
        raise SystemExit(f"the context did not stop: {context}")

    print("7. its history")
    events = client.get("/v1/events", params={"context_id": context["id"]}).raise_for_status()
    for event in reversed(events.json()["events"]):
        move = f"{event['from_state'] or '-'} -> {event['to_state']}" if event["to_state"] else ""
        print(f"  {event['at'][11:19]} {event['kind']:7} {move:22} {event['reason']}")
    print(f"done: context ran {context['cost_so_far']:.5f} (cost units) worth of compute")


if __name__ == "__main__":
    main()
