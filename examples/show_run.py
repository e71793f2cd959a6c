"""After the demo DAG ran: show its outputs, its leases, and the contexts stopping once
their idle grace period is over."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import polars as pl

from pclease_client import ContextState, PcleaseClient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--lake", required=True, type=Path)
    parser.add_argument("--dag-id", required=True)
    args = parser.parse_args()

    print("\n== outputs")
    for path in sorted(args.lake.rglob("*.parquet")):
        frame = pl.read_parquet(path)
        print(f"{path}: {frame.height} rows, columns {frame.columns}")
    revenue = pl.read_parquet(args.lake / "joined" / "revenue_by_customer.parquet")
    print(revenue.sort("revenue", descending=True).head(5))

    with PcleaseClient(args.url, args.token) as client:
        leases = client.list_leases(dag_id=args.dag_id)
        latest_run = leases[0].holder["run_id"]
        mine = [lease for lease in leases if lease.holder["run_id"] == latest_run]
        print(f"\n== leases of run {latest_run}")
        for lease in reversed(mine):
            print(
                f"{lease.holder['task_id']:<28} profile={lease.profile:<6} "
                f"context={lease.context_id[:8]} {lease.state}"
            )
        contexts = {lease.context_id for lease in mine}
        print(f"\n== {len(contexts)} contexts; waiting for their idle grace to stop them")
        deadline = time.monotonic() + 60
        states: dict[str, ContextState] = {}
        while time.monotonic() < deadline:
            states = {c: client.get_context(c).state for c in contexts}
            if all(state is ContextState.STOPPED for state in states.values()):
                break
            time.sleep(1)
        for context_id, state in states.items():
            print(f"context {context_id[:8]}: {state}")
    print(f"\nthe dashboard was at {args.url}/ui/; the demo stops the service now")


if __name__ == "__main__":
    main()
