"""Queries through a lease against a live server on the local backend.

    .venv/bin/python bench/query_bench.py [--tiny 200] [--rounds 3] [--no-write]

Queries are driven with the Python client (``lease.remote(lf).collect()``): submit, long
poll, fetch the result, as a task does. The client's own share is small next to the
service's for a tiny query, but it is in the figure.

1. A tiny query through a lease against ``collect()`` in this process, timed alternately
   in the same loop: p50 and p99 of each (goal: within 10 ms p50 of in-process).
2. A ``collect`` result of about 100 MB through the service (goal: 500 MB/s or more),
   from submission to the frame in hand; the ceiling is the same frame collected, written
   as Arrow IPC and read back in this process, measured in the same round.
3. Submitting a plan that embeds a 50 MB DataFrame: time to accepted and to finished.

Each round measures 1 and 2 again; the figures are the medians over the rounds. The load
average (``/proc/loadavg``) is reported, as the machine may be shared.

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
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.live import LiveServer, run_cli, write_config
from pclease_client import PcleaseClient, build_submission


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def one_round(
    lease: Any, tiny: pl.LazyFrame, big: pl.LazyFrame, tiny_runs: int, big_runs: int, work: Path
) -> dict[str, float]:
    remote, local = [], []
    for _ in range(tiny_runs):
        t0 = time.perf_counter()
        lease.remote(tiny).collect()
        remote.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tiny.collect()
        local.append(time.perf_counter() - t0)
    speeds, ceilings, size = [], [], 0
    for _ in range(big_runs):
        t0 = time.perf_counter()
        result = lease.remote(big).collect()
        elapsed = time.perf_counter() - t0
        size = result.estimated_size()
        speeds.append(size / elapsed / 1e6)
        del result
        path = work / "ceiling.arrow"
        t0 = time.perf_counter()
        big.collect().write_ipc(path)
        pl.read_ipc(path)
        ceilings.append(size / (time.perf_counter() - t0) / 1e6)
        path.unlink()
    return {
        "remote_p50": 1000 * statistics.median(remote),
        "remote_p99": 1000 * pct(remote, 0.99),
        "local_p50": 1000 * statistics.median(local),
        "remote_mbps": statistics.median(speeds),
        "local_mbps": statistics.median(ceilings),
        "size": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="pclease query benchmark")
    parser.add_argument("--tiny", type=int, default=200, help="tiny queries to time")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 1 and 2")
    parser.add_argument("--big-runs", type=int, default=3, help="collects per round")
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
        load_before = load()
        try:
            with client.lease("bench", ttl_s=600) as lease:
                tiny = pl.LazyFrame({"a": [1, 2, 3]}).select(pl.col("a").sum())
                for _ in range(10):  # warm the worker's executor
                    lease.remote(tiny).collect()
                rows = args.big_mb * 1024 * 1024 // 16
                # Generated on the context from a tiny plan: the result is what travels.
                big = pl.LazyFrame().select(
                    i=pl.int_range(rows, dtype=pl.Int64), x=pl.int_range(rows, dtype=pl.Int64) * 3
                )
                rounds = []
                for number in range(1, args.rounds + 1):
                    measured = one_round(lease, tiny, big, args.tiny, args.big_runs, work)
                    rounds.append(measured)
                    print(f"round {number}: {measured}", flush=True)
                r50 = statistics.median(r["remote_p50"] for r in rounds)
                r99 = statistics.median(r["remote_p99"] for r in rounds)
                l50 = statistics.median(r["local_p50"] for r in rounds)
                per_round = ", ".join(f"{r['remote_p50']:.1f}" for r in rounds)
                lines.append(
                    f"| tiny query through a lease ({args.rounds} x {args.tiny} runs) | p50 "
                    f"{r50:.1f} ms, p99 {r99:.1f} ms | in-process collect p50 {l50:.2f} ms; "
                    f"overhead p50 {r50 - l50:.1f} ms (rounds: {per_round} ms) | within 10 ms "
                    f"p50 of in-process: {'met' if r50 - l50 <= 10 else 'not met'} |"
                )
                print(lines[-1], flush=True)
                mbps = statistics.median(r["remote_mbps"] for r in rounds)
                ceiling = statistics.median(r["local_mbps"] for r in rounds)
                per_round = ", ".join(f"{r['remote_mbps']:.0f}" for r in rounds)
                lines.append(
                    f"| collect of a {rounds[0]['size'] / 1e6:.0f} MB result ({args.rounds} x "
                    f"{args.big_runs} runs) | median {mbps:.0f} MB/s (rounds: {per_round}) | "
                    f"submit + run + transfer + read; in-process collect + write_ipc + read_ipc "
                    f"{ceiling:.0f} MB/s, ratio {mbps / ceiling:.2f} | 500 MB/s or more: "
                    f"{'met' if mbps >= 500 else 'not met'} |"
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
        load_after = load()
        print(f"load average {load_before} before, {load_after} after", flush=True)

    if args.no_write:
        return
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    with path.open("a") as out:
        out.write(
            f"\n### Queries through a lease, {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
            f"{os.cpu_count()} cores, Python {platform.python_version()}, local backend)\n\n"
            f"`bench/query_bench.py`; load average {load_before} before, {load_after} after\n\n"
            "| what | figure | notes | goal |\n|---|---|---|---|\n" + "\n".join(lines) + "\n"
        )
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
