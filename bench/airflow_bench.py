"""What a warm-up setup task saves a DAG: the example pipeline's shape, run by a real
Airflow 3 (``dag.test()``) against a live pclease on the local backend.

    .venv/bin/python bench/airflow_bench.py [--runs 3] [--boot-s 5]

``bench_cold`` leases ``large`` when its join task starts; ``bench_warm`` has a setup task
lease it at the start of the run and wait for it to run; ``bench_warm_nowait`` has one that
leases it and ends at once, so the context boots while the ``small`` tasks work.
Each run starts with no context running (the bench waits out the idle grace). Reported
per variant, as medians: how long the join task waited for its context, and the run's wall
time. The local backend's ``boot_delay_s`` stands in for a Polars Cloud start (which takes
minutes rather than seconds). Results are appended to ``docs/benchmarks.md`` unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.airflow_env import AirflowEnv  # noqa: E402 (needs the path above)
from devkit.live import LiveServer, run_cli, write_config  # noqa: E402

DAGS = ROOT / "bench" / "dags" / "warm_vs_cold.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--boot-s", type=float, default=5.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pclease-bench-") as tmp_name:
        tmp = Path(tmp_name)
        lake = tmp / "lake"
        lake.mkdir()
        profile = {"idle_grace_s": 1, "data_roots": [str(lake)]}
        config = write_config(
            tmp / "pclease.toml",
            {
                "data_dir": str(tmp / "svc"),
                "database_url": f"sqlite:///{tmp / 'svc.db'}",
                "backend": "local",
                "reconcile_interval_s": 0.2,
            },
            {
                "small": {"cpus": 1, "memory_gb": 1, "local": {"boot_delay_s": 1.0}, **profile},
                "large": {
                    "cpus": 2,
                    "memory_gb": 2,
                    "local": {"boot_delay_s": args.boot_s},
                    **profile,
                },
            },
        )
        run_cli(config, "db", "upgrade")
        token = run_cli(config, "token", "create", "bench", "--scope", "admin").strip()
        server = LiveServer(config, tmp / "server.log").start()
        try:
            airflow = AirflowEnv(tmp / "airflow", DAGS.parent, PCLEASE_DEMO_LAKE=str(lake))
            airflow.migrate()
            airflow.add_pclease_connection("pclease_default", server.url, token)
            results = {
                variant: [run_once(airflow, server.url, token, variant) for _ in range(args.runs)]
                for variant in ("bench_cold", "bench_warm", "bench_warm_nowait")
            }
        finally:
            server.stop()
    report(results, args)


def run_once(airflow: AirflowEnv, url: str, token: str, dag_id: str) -> tuple[float, float]:
    headers = {"Authorization": f"Bearer {token}"}
    wait_until_idle(url, headers)
    started = time.perf_counter()
    run = airflow.run_dag(DAGS, dag_id)
    wall = time.perf_counter() - started
    if run.state != "success":
        raise SystemExit(f"{dag_id} failed:\n{run.output[-3000:]}")
    leases = httpx.get(
        f"{url}/v1/leases", params={"dag_id": dag_id, "run_id": run.run_id}, headers=headers
    ).json()["leases"]
    (join,) = [lease for lease in leases if lease["holder"]["task_id"] == "join_datasets"]
    waited = (_at(join["activated_at"]) - _at(join["created_at"])).total_seconds()
    print(f"{dag_id}: join waited {waited:.2f} s for its context; run took {wall:.1f} s")
    return waited, wall


def wait_until_idle(url: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        live = httpx.get(
            f"{url}/v1/contexts",
            params={"state": ["starting", "running", "idle", "stopping"]},
            headers=headers,
        ).json()["contexts"]
        if not live:
            return
        time.sleep(0.5)
    raise SystemExit("contexts did not stop between runs")


def _at(value: str) -> datetime:
    return datetime.fromisoformat(value)


def report(results: dict[str, list[tuple[float, float]]], args: argparse.Namespace) -> None:
    rows = []
    for variant, runs in results.items():
        waits, walls = [w for w, _ in runs], [t for _, t in runs]
        rows.append((variant, statistics.median(waits), statistics.median(walls)))
    cold, warm, nowait = rows
    lines = [
        "",
        f"### {time.strftime('%Y-%m-%d')}: {args.runs} runs per variant, "
        f"`large` boot {args.boot_s:g} s, {platform.machine()} ({platform.python_version()})",
        "",
        "| variant | join's wait for its context (median) | run wall time (median) |",
        "|---|---|---|",
        *(f"| `{v}` | {w:.2f} s | {t:.1f} s |" for v, w, t in rows),
        "",
        f"Wall time ratios against `bench_cold`: warm {warm[2] / cold[2]:.2f}, "
        f"warm without waiting {nowait[2] / cold[2]:.2f}. `dag.test()` runs one task at a "
        "time, so a setup task that waits for the boot blocks the run just as long as the "
        "join would have; under a parallel executor it overlaps with the `small` tasks.",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = ROOT / "docs" / "benchmarks.md"
        content = path.read_text()
        heading = "## Warm-up setup tasks in Airflow (`bench/airflow_bench.py`)"
        if heading not in content:
            content += (
                f"\n{heading}\n\nHow long the example pipeline's join waits for the `large` "
                "context with and without a setup task that leases `large` at the start of "
                "the run (`warm_profile`). A real Airflow 3 runs the DAGs with `dag.test()`, "
                "which runs tasks one at a time, so the `small` tasks' work is what the "
                "warm-up overlaps with.\n"
            )
        path.write_text(content + text + "\n")


if __name__ == "__main__":
    main()
