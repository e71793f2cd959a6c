"""The lease API under ``wrk`` against a live ``pclease serve``, beside a minimal FastAPI
endpoint measured in the same run as the ceiling.

    .venv/bin/python bench/http_bench.py [--db sqlite|postgres|both] [--runs 3]
        [--duration 10] [--connections 64] [--leases 100,10000] [--profile DIR]
        [--workers N]

For each database: a real ``pclease serve`` (uvicorn, one worker, the database migrated by
Alembic, the local backend) and ``bench/ceiling.py`` (the same uvicorn options) run side by
side. Each run measures, one after the other, the ceiling, heartbeats on warm leases
(``--warm-leases``, 64 by default: each heartbeat goes to the next one, as tasks heartbeat
their own leases), GETs of those leases and create + release on the warm context
(``bench/wrk/*.lua``), each for ``--duration`` seconds with one wrk thread and
``--connections`` connections. The figures
are medians over the runs; each run's latency percentiles come from wrk. Any non-2xx
answer, socket error or timeout fails the benchmark. Then it fills the database to each
``--leases`` count of live leases and reports the server's RSS and the heartbeat and
create + release figures there. ``--profile DIR`` also records a py-spy profile of the
server during one heartbeat, GET and create + release run (py-spy: ``pip install py-spy``).
``--workers N`` serves with ``pclease serve --workers N`` (N replicas of one process each
on one port); memory and profiles are then not measured (they are per process).

wrk is a Debian package: ``apt-get install wrk``. The load generator shares the machine's
cores with the server (and PostgreSQL), so the ceiling is measured under the same handicap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devkit.live import LiveServer, free_port, run_cli, write_config

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("PCLEASE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
WRK_DIR = ROOT / "bench" / "wrk"
ENDPOINTS = ("ceiling", "heartbeat", "get", "create_release")
PROFILE = "bench"


def require_wrk() -> str:
    wrk = shutil.which("wrk")
    if wrk is None:
        sys.exit(
            "wrk is not installed; it is a Debian package: `sudo apt-get install wrk` "
            "(or build it from https://github.com/wg/wrk)"
        )
    return wrk


@dataclass
class Run:
    endpoint: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int


def wrk(url: str, script: str, args: list[str], token: str, duration: int, conns: int) -> Run:
    cmd = [
        require_wrk(),
        "-t1",
        f"-c{conns}",
        f"-d{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(WRK_DIR / f"{script}.lua"),
        url,
        "--",
        *args,
    ]
    env = {**os.environ, "PCLEASE_BENCH_TOKEN": token}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    r = json.loads(line.removeprefix("WRK_JSON "))
    bad = {k: r[k] for k in ("connect_errors", "read_errors", "write_errors", "status_errors")}
    bad["timeouts"] = r["timeouts"]
    if any(bad.values()):
        raise SystemExit(f"{script}: wrk saw errors {bad}:\n{out.stdout}")
    return Run(
        script,
        r["requests"] / (r["duration_us"] / 1e6),
        r["p50_us"] / 1000,
        r["p99_us"] / 1000,
        r["requests"],
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


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


def live_leases(url: str) -> int:
    """Pending and active leases, once requests still in flight after wrk stopped landed."""
    last = -1
    while True:
        now = _count_live(url)
        if now == last:
            return now
        last = now
        time.sleep(1)


def _count_live(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM leases WHERE state IN ('pending', 'active')")
                ).scalar_one()
            )
    finally:
        engine.dispose()


async def create_leases(url: str, token: str, count: int) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    body = {"profile": PROFILE, "ttl_s": 3600, "holder": {"task_id": "fill"}}

    async def worker(n: int) -> None:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            for _ in range(n):
                r = await client.post("/v1/leases", json=body)
                if r.status_code != 201:
                    raise SystemExit(f"filling leases: {r.status_code} {r.text}")

    workers = 8
    await asyncio.gather(
        *(worker(count // workers + (i < count % workers)) for i in range(workers))
    )


@dataclass
class Result:
    db: str
    runs: dict[str, list[Run]] = field(default_factory=lambda: {e: [] for e in ENDPOINTS})
    memory: list[dict[str, Any]] = field(default_factory=list)
    rss_idle_mb: float = 0.0


def median(runs: list[Run], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def py_spy(pid: int, out: Path, duration: int) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(duration),
            "--rate",
            "200",
            "--gil",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def bench_database(kind: str, args: argparse.Namespace) -> Result:
    result = Result(kind)
    with tempfile.TemporaryDirectory(prefix="pcl-http-bench-") as tmp:
        workdir = Path(tmp)
        url, dbname = make_database(kind, workdir)
        ceiling = None
        try:
            config = write_config(
                workdir / "bench.toml",
                {
                    "data_dir": str(workdir / "data"),
                    "database_url": url,
                    "backend": "local",
                    "lease_ttl_max_s": 7200,
                },
                {
                    PROFILE: {
                        "cpus": 1,
                        "memory_gb": 1,
                        "idle_grace_s": 600,
                        "max_leases_per_context": 100_000,
                    }
                },
            )
            run_cli(config, "db", "upgrade")
            token = run_cli(config, "token", "create", "bench", "--scope", "lease").strip()
            serve_args = ("--workers", str(args.workers)) if args.workers > 1 else ()
            server = LiveServer(config, workdir / "server.log", serve_args=serve_args).start()
            port = free_port()
            ceiling = subprocess.Popen(
                [sys.executable, str(ROOT / "bench" / "ceiling.py"), str(port)],
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            ceiling_url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    if httpx.get(f"{ceiling_url}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)
            try:
                headers = {"Authorization": f"Bearer {token}"}
                warm = []
                for _ in range(args.warm_leases):
                    r = httpx.post(
                        f"{server.url}/v1/leases",
                        json={"profile": PROFILE, "ttl_s": 3600},
                        headers=headers,
                    )
                    assert r.status_code == 201, r.text
                    warm.append(r.json()["id"])
                r = httpx.get(
                    f"{server.url}/v1/leases/{warm[-1]}",
                    params={"wait_s": 60, "state": "pending"},
                    headers=headers,
                    timeout=90,
                )
                assert r.status_code == 200 and r.json()["state"] == "active", r.text
                lease = ",".join(warm)
                assert server.proc is not None
                pid = server.proc.pid
                result.rss_idle_mb = rss_mb(pid)

                def measure(endpoint: str, duration: int) -> Run:
                    if endpoint == "ceiling":
                        return wrk(ceiling_url, "ceiling", [], token, duration, args.connections)
                    script_args = [PROFILE] if endpoint == "create_release" else [lease]
                    return wrk(server.url, endpoint, script_args, token, duration, args.connections)

                for endpoint in ENDPOINTS:  # warm-up: caches, pools, JIT-free but still
                    measure(endpoint, 2)
                for run in range(args.runs):
                    for endpoint in ENDPOINTS:
                        spy = None
                        if (
                            args.profile
                            and args.workers == 1
                            and run == 0
                            and endpoint != "ceiling"
                        ):
                            out = args.profile / f"{kind}-{endpoint}.txt"
                            spy = py_spy(pid, out, args.duration)
                        measured = measure(endpoint, args.duration)
                        if spy is not None:
                            spy.wait(30)
                        result.runs[endpoint].append(measured)
                        print(
                            f"{kind} run {run + 1} {endpoint}: {measured.rps:,.0f} req/s "
                            f"p50 {measured.p50_ms:.1f} ms p99 {measured.p99_ms:.1f} ms",
                            flush=True,
                        )
                for target in args.leases if args.workers == 1 else []:
                    have = live_leases(url)
                    if target > have:
                        asyncio.run(create_leases(server.url, token, target - have))
                    live = live_leases(url)
                    row: dict[str, Any] = {"leases": live, "rss_mb": rss_mb(pid)}
                    for endpoint in ("ceiling", "heartbeat", "create_release"):
                        runs = [measure(endpoint, args.duration) for _ in range(args.runs)]
                        row[endpoint] = runs
                    row["rss_after_mb"] = rss_mb(pid)
                    result.memory.append(row)
                    print(
                        f"{kind} at {live} live leases: RSS {row['rss_mb']:.0f} MB, heartbeat "
                        f"{median(row['heartbeat'], 'rps'):,.0f} req/s, create+release "
                        f"{median(row['create_release'], 'rps'):,.0f} req/s, RSS after "
                        f"{row['rss_after_mb']:.0f} MB",
                        flush=True,
                    )
            finally:
                server.stop()
        finally:
            if ceiling is not None:
                ceiling.terminate()
                ceiling.wait(10)
            drop_database(dbname)
    return result


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"### {time.strftime('%Y-%m-%d')}: {args.workers} worker(s), wrk -t1 "
        f"-c{args.connections}, {args.duration} s, "
        f"median of {args.runs} runs ({platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()})",
        "",
        "| db | endpoint | req/s (median) | ratio to ceiling | p50 / p99 ms | req/s per run |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        ceiling = median(res.runs["ceiling"], "rps")
        for endpoint in ENDPOINTS:
            runs = res.runs[endpoint]
            rps = median(runs, "rps")
            lines.append(
                f"| {res.db} | {endpoint} | {rps:,.0f} | {rps / ceiling:.2f} | "
                f"{median(runs, 'p50_ms'):.1f} / {median(runs, 'p99_ms'):.1f} | "
                + " / ".join(f"{r.rps:,.0f}" for r in runs)
                + " |"
            )
    lines += [
        "",
        "| db | live leases | RSS MB (before / after) | ceiling req/s | heartbeat req/s, "
        "p99 ms | create+release req/s, p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for res in results:
        for row in res.memory:
            lines.append(
                f"| {res.db} | {row['leases']:,} | {row['rss_mb']:.0f} / {row['rss_after_mb']:.0f}"
                f" | {median(row['ceiling'], 'rps'):,.0f}"
                f" | {median(row['heartbeat'], 'rps'):,.0f}, "
                f"{median(row['heartbeat'], 'p99_ms'):.1f}"
                f" | {median(row['create_release'], 'rps'):,.0f}, "
                f"{median(row['create_release'], 'p99_ms'):.1f} |"
            )
    lines.append("")
    lines.append(
        "Idle RSS after start-up and one lease: "
        + ", ".join(f"{r.db} {r.rss_idle_mb:.0f} MB" for r in results)
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="pclease HTTP benchmark (wrk)")
    parser.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--leases", default="100,10000", help="live-lease counts for memory")
    parser.add_argument(
        "--warm-leases",
        type=int,
        default=64,
        help="leases the heartbeat and GET runs go through, one after the other",
    )
    parser.add_argument("--profile", type=Path, default=None, help="py-spy profiles here")
    parser.add_argument("--workers", type=int, default=1, help="pclease serve --workers")
    args = parser.parse_args()
    args.leases = [int(n) for n in args.leases.split(",") if n]
    require_wrk()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    kinds = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    results = [bench_database(kind, args) for kind in kinds]
    print()
    print(report(results, args))


if __name__ == "__main__":
    main()
