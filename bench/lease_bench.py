"""Lease throughput and latency against a live ``pclease serve`` on a warm context.

    .venv/bin/python bench/lease_bench.py [--requests 3000] [--db sqlite|postgres|both]

For each database and each concurrency (1, 16, 64 clients) it runs lease-create,
heartbeat and release cycles on a profile whose context is already running, and reports
requests/s and p50/p99 latency per operation. Results are appended to
``docs/benchmarks.md`` unless ``--no-write``. The load generator runs on the same machine
as the server (and, for PostgreSQL, the database), so all three share its cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.live import LiveServer, run_cli, write_config

PG_ADMIN = os.environ.get("PCLEASE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
OPS = ("create", "heartbeat", "release")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def run_load(url: str, token: str, clients: int, cycles: int) -> dict[str, object]:
    latencies: dict[str, list[float]] = {op: [] for op in OPS}
    errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    per_client = max(1, cycles // clients)

    async def client_loop(i: int) -> None:
        nonlocal errors
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(
            base_url=url, headers=headers, limits=limits, timeout=30
        ) as client:
            for n in range(per_client):
                t0 = time.perf_counter()
                r = await client.post(
                    "/v1/leases", json={"profile": "bench", "holder": {"task_id": f"c{i}-{n}"}}
                )
                t1 = time.perf_counter()
                if r.status_code != 201:
                    errors += 1
                    continue
                lease_id = r.json()["id"]
                h = await client.post(f"/v1/leases/{lease_id}/heartbeat")
                t2 = time.perf_counter()
                d = await client.delete(f"/v1/leases/{lease_id}")
                t3 = time.perf_counter()
                errors += (h.status_code != 200) + (d.status_code != 200)
                latencies["create"].append(t1 - t0)
                latencies["heartbeat"].append(t2 - t1)
                latencies["release"].append(t3 - t2)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(clients)))
    wall = time.perf_counter() - started
    total = sum(len(v) for v in latencies.values())
    return {
        "clients": clients,
        "requests": total,
        "errors": errors,
        "rps": total / wall,
        "lease_rps": len(latencies["create"]) / wall,
        **{f"{op}_p50_ms": 1000 * statistics.median(latencies[op]) for op in OPS},
        **{f"{op}_p99_ms": 1000 * percentile(latencies[op], 0.99) for op in OPS},
    }


def make_database(kind: str, workdir: Path) -> tuple[str, str | None]:
    if kind == "sqlite":
        return f"sqlite:///{workdir / 'bench.db'}", None
    name = f"pclease_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    return f"{base}/{name}", name


def drop_database(name: str | None) -> None:
    if name:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bench_database(kind: str, cycles: int, concurrency: list[int]) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory(prefix="pcl-bench-") as tmp:
        workdir = Path(tmp)
        url, dbname = make_database(kind, workdir)
        try:
            config = write_config(
                workdir / "bench.toml",
                {
                    "data_dir": str(workdir / "data"),
                    "database_url": url,
                    "backend": "local",
                    "token_cache_s": 30,
                },
                {
                    "bench": {
                        "cpus": 1,
                        "memory_gb": 1,
                        "idle_grace_s": 600,
                        "max_leases_per_context": 100000,
                    }
                },
            )
            run_cli(config, "db", "upgrade")
            token = run_cli(config, "token", "create", "bench", "--scope", "lease").strip()
            server = LiveServer(config, workdir / "server.log").start()
            try:
                headers = {"Authorization": f"Bearer {token}"}
                warm = httpx.post(
                    f"{server.url}/v1/leases",
                    json={"profile": "bench", "ttl_s": 3600},
                    headers=headers,
                ).json()
                httpx.get(
                    f"{server.url}/v1/leases/{warm['id']}",
                    params={"wait_s": 30, "state": "pending"},
                    headers=headers,
                )
                results = []
                for clients in concurrency:
                    asyncio.run(run_load(server.url, token, clients, min(200, cycles)))  # warm-up
                    result = asyncio.run(run_load(server.url, token, clients, cycles))
                    result["db"] = kind
                    print(format_row(result), flush=True)
                    results.append(result)
                return results
            finally:
                server.stop()
        finally:
            drop_database(dbname)


def format_row(r: dict[str, object]) -> str:
    def f(key: str) -> str:
        return f"{float(r[key]):.1f}"  # type: ignore[arg-type]

    return (
        f"| {r['db']} | {r['clients']} | {r['requests']} | {r['errors']} | {f('rps')} | "
        f"{f('lease_rps')} | {f('create_p50_ms')} / {f('create_p99_ms')} | "
        f"{f('heartbeat_p50_ms')} / {f('heartbeat_p99_ms')} | "
        f"{f('release_p50_ms')} / {f('release_p99_ms')} |"
    )


HEADER = (
    "| db | clients | requests | errors | requests/s | lease cycles/s | create p50/p99 ms | "
    "heartbeat p50/p99 ms | release p50/p99 ms |\n|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    parser = argparse.ArgumentParser(description="pclease lease benchmark")
    parser.add_argument(
        "--cycles", type=int, default=1500, help="lease cycles (create+heartbeat+release) per run"
    )
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]

    print(HEADER)
    rows = []
    for kind in kinds:
        rows += bench_database(kind, args.cycles, concurrency)
    if args.no_write:
        return
    path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
    section = (
        f"\n### Lease API, {time.strftime('%Y-%m-%d')} ({platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()})\n\n"
        f"`bench/lease_bench.py --cycles {args.cycles}`: each cycle is create + heartbeat + "
        "release on a warm context.\n\n"
        + HEADER
        + "\n"
        + "\n".join(format_row(r) for r in rows)
        + "\n"
    )
    with path.open("a") as out:
        out.write(section)
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
