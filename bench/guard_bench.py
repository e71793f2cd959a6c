"""How fast the plan guard reads a plan that embeds a DataFrame (in-process, one core).

    .venv/bin/python bench/guard_bench.py [--mb 10,50] [--runs 5]

For each size: a ``collect`` plan over a LazyFrame of float64 values of that many MB, built
the way the client builds it, then ``guard.inspect`` on it ``--runs`` times; reports the
plan's size and the median MB/s. The service runs the same guard when it accepts a plan and
the executor runs it again before Polars reads the plan.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pclease_client.plans import build_submission
from pclease_service.plans import guard


def main() -> None:
    parser = argparse.ArgumentParser(description="plan guard throughput")
    parser.add_argument("--mb", default="10,50", help="frame sizes in MB")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    print("| frame | plan | guard MB/s (median) | per run |\n|---|---|---|---|")
    for mb in (int(m) for m in args.mb.split(",")):
        rows = mb * 1_000_000 // 8
        frame = pl.LazyFrame({"v": pl.int_range(rows, eager=True).cast(pl.Float64) / 7})
        plan = build_submission(frame.select(pl.col("v").sum()), "collect").plan
        speeds = []
        for _ in range(args.runs):
            started = time.perf_counter()
            info = guard.inspect(plan, allow_python_udfs=False)
            speeds.append(len(plan) / 1e6 / (time.perf_counter() - started))
            assert info.collects
        print(
            f"| {mb} MB | {len(plan) / 1e6:.1f} MB | {statistics.median(speeds):.0f} | "
            + " / ".join(f"{s:.0f}" for s in speeds)
            + " |",
            flush=True,
        )


if __name__ == "__main__":
    main()
