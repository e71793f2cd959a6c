"""Queries through a lease against a live server on the local backend.

    .venv/bin/python bench/query_bench.py [--tiny 200] [--no-write]

1. Overhead of a tiny query through a lease (submit, run on the worker, fetch the result)
   versus ``collect()`` in this process: p50 and p99 (goal: under 20 ms p50).
2. Throughput of a ``collect`` result of about 100 MB through the service (goal: above
   200 MB/s), measured from submission to the last byte read.
3. Submitting a plan that embeds a 50 MB DataFrame: time to accepted and to finished.

Results are appended to ``docs/benchmarks.md`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.live import LiveServer, run_cli, write_config
from pclease_client import PcleaseClient, build_submission


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description="pclease query benchmark")
    parser.add_argument("--tiny", type=int, default=200, help="tiny queries to time")
    parser.add_argument("--big-mb", type=int, default=100)
    parser.add_argument("--plan-mb", type=int, default=50)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pcl-qbench-") as tmp:
        work = Path(tmp)
        config = write_config(
            work / "bench.toml",
            {
                "data_dir": str(work / "svc"),
                "backend": "local",
                "token_cache_s": 30,
                "max_result_bytes": 4 * 1024**3,
                "reconcile_interval_s": 0.5,
            },
            {
                "bench": {
                    "cpus": 2,
                    "memory_gb": 16,
                    "idle_grace_s": 600,
                    "data_roots": [str(work / "lake")],
                }
            },
        )
        (work / "lake").mkdir()
        run_cli(config, "db", "upgrade")
        token = run_cli(config, "token", "create", "bench", "--scope", "lease").strip()
        server = LiveServer(config, work / "server.log").start()
        client = PcleaseClient(server.url, token)
        lines = []
        try:
            with client.lease("bench", ttl_s=600) as lease:
                tiny = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum())
                for _ in range(10):  # warm the worker's executor
                    lease.remote(tiny).collect()
                remote, local = [], []
                for _ in range(args.tiny):
                    t0 = time.perf_counter()
                    lease.remote(tiny).collect()
                    remote.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    tiny.collect()
                    local.append(time.perf_counter() - t0)
                r50, r99 = 1000 * statistics.median(remote), 1000 * pct(remote, 0.99)
                l50 = 1000 * statistics.median(local)
                lines.append(
                    f"| tiny query through a lease ({args.tiny} runs) | p50 {r50:.1f} ms, "
                    f"p99 {r99:.1f} ms | in-process collect p50 "
                    f"{l50:.2f} ms; overhead p50 {r50 - l50:.1f} ms | under 20 ms p50: "
                    f"{'met' if r50 < 20 else 'not met'} |"
                )
                print(lines[-1], flush=True)

                rows = args.big_mb * 1024 * 1024 // 16
                # Generated on the context from a tiny plan: the result is what travels.
                big = pl.LazyFrame().select(
                    i=pl.int_range(rows, dtype=pl.Int64), x=pl.int_range(rows, dtype=pl.Int64) * 3
                )
                sizes, speeds = [], []
                for _ in range(3):
                    t0 = time.perf_counter()
                    result = lease.remote(big).collect()
                    elapsed = time.perf_counter() - t0
                    size = result.estimated_size()
                    sizes.append(size)
                    speeds.append(size / elapsed / 1e6)
                mbps = statistics.median(speeds)
                lines.append(
                    f"| collect of a {sizes[0] / 1e6:.0f} MB result (3 runs) | median "
                    f"{mbps:.0f} MB/s | submit + run + transfer + read_ipc | above 200 MB/s: "
                    f"{'met' if mbps > 200 else 'not met'} |"
                )
                print(lines[-1], flush=True)

                n = args.plan_mb * 1024 * 1024 // 8
                embedded = pl.LazyFrame({"v": pl.int_range(n, eager=True).cast(pl.Float64) / 7})
                t0 = time.perf_counter()
                sub = build_submission(embedded.select(pl.col("v").sum()), "collect")
                built = time.perf_counter() - t0
                t0 = time.perf_counter()
                query = client.submit(lease.id, sub)
                accepted = time.perf_counter() - t0
                client.wait_query(query.id)
                finished = time.perf_counter() - t0
                lines.append(
                    f"| plan embedding a {len(sub.plan) / 1e6:.0f} MB DataFrame | accepted in "
                    f"{accepted:.2f} s, finished in {finished:.2f} s | building the plan took "
                    f"{built:.2f} s on the client | - |"
                )
                print(lines[-1], flush=True)
        finally:
            client.close()
            server.stop()

    if args.no_write:
        return
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    with path.open("a") as out:
        out.write(
            f"\n### Queries through a lease, {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}, local backend)\n\n"
            "`bench/query_bench.py`\n\n| what | figure | notes | goal |\n|---|---|---|---|\n"
            + "\n".join(lines)
            + "\n"
        )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
