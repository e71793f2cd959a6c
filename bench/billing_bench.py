"""What compute a pipeline is billed for under three policies, on a real Airflow 3
deployment (scheduler with the LocalExecutor, DAG processor, API server, a PostgreSQL
metastore) against a live pclease on the local backend.

    .venv/bin/python bench/billing_bench.py [--runs 3] [--boot-s 10]

The pipeline is the seed pipeline's shape (``bench_cold`` in ``bench/dags/``:
prepare_dataset_1 and prepare_dataset_2 on ``small`` in parallel, then join_datasets on
``large``), run ``--runs`` times in a row, under each policy in turn:

- ``pclease``: contexts shared per profile, stopped after the example's idle grace (5 s);
- ``per-task``: every task starts a context of its own and stops it when it ends (one
  lease per context, no grace) -- what a task that drives Polars Cloud itself does;
- ``idle-10min``: contexts shared, stopped by a fixed 10-minute idle timeout (Polars
  Cloud's minimum ``idle_timeout_mins``).

Billed instance-seconds come from pclease's own ledger (``pclease_instance_seconds`` on
``/metrics``: every second a context existed, starting, running, idle or stopping), read
before and after each run; query seconds are the queries' own run times. A context still
idle when the last run ends is billed until its idle stop (its ``stops_at``), which is
added to the last run rather than waited out. The local backend's ``boot_delay_s`` stands
in for a Polars Cloud start. Results are appended to ``docs/benchmarks.md`` unless
``--no-write``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.airflow_deployment import AirflowDeployment, free_port  # noqa: E402
from devkit.live import LiveServer, run_cli, write_config  # noqa: E402

DAG_ID = "bench_cold"
POLICIES: dict[str, dict[str, Any]] = {
    "pclease": {"idle_grace_s": 5},
    "per-task": {"idle_grace_s": 0, "max_leases_per_context": 1, "max_contexts": 4},
    "idle-10min": {"idle_grace_s": 600},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--boot-s", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pclease-bench-") as tmp_name:
        tmp = Path(tmp_name)
        lake = tmp / "lake"
        lake.mkdir()
        port = free_port()
        airflow = AirflowDeployment(
            tmp / "airflow", ROOT / "bench" / "dags", env={"PCLEASE_DEMO_LAKE": str(lake)}
        )
        with airflow.start():
            for policy, shape in POLICIES.items():
                service = tmp / policy
                service.mkdir()
                profile = {"data_roots": [str(lake)], **shape}
                config = write_config(
                    service / "pclease.toml",
                    {
                        "data_dir": str(service / "svc"),
                        "database_url": f"sqlite:///{service / 'svc.db'}",
                        "backend": "local",
                        "reconcile_interval_s": 0.2,
                    },
                    {
                        "small": {"cpus": 1, "memory_gb": 1, "local": {"boot_delay_s": args.boot_s}}
                        | profile,
                        "large": {"cpus": 2, "memory_gb": 2, "local": {"boot_delay_s": args.boot_s}}
                        | profile,
                    },
                )
                run_cli(config, "db", "upgrade")
                token = run_cli(config, "token", "create", "bench", "--scope", "admin").strip()
                server = LiveServer(config, service / "server.log")
                server.port, server.url = port, f"http://127.0.0.1:{port}"
                server.start()
                try:
                    if policy != "pclease":  # the same address, a new service's token
                        airflow.airflow("connections", "delete", "pclease_default")
                    airflow.add_connection(
                        "pclease_default", "pclease", host="127.0.0.1", port=port, password=token
                    )
                    airflow.wait_for_dags(DAG_ID)
                    results[policy] = measure(airflow, server.url, token, args.runs, policy)
                finally:
                    server.stop()
    report(results, args)


def measure(
    airflow: AirflowDeployment, url: str, token: str, runs: int, policy: str
) -> list[tuple[float, float, float]]:
    """Per run: (billed instance-seconds, query seconds, wall seconds)."""
    headers = {"Authorization": f"Bearer {token}"}
    out = []
    for i in range(runs):
        before = instance_seconds(url)
        started = time.monotonic()
        run = airflow.run_dag(DAG_ID, timeout_s=600)
        wall = time.monotonic() - started
        if run.state != "success":
            raise SystemExit(f"{run} failed under {policy}")
        last = i == runs - 1
        if last:
            wait_until_only_idle(url, headers)
        billed = instance_seconds(url) - before
        if last:
            billed += idle_tail_s(url, headers)
        leases = httpx.get(
            f"{url}/v1/leases", params={"dag_id": DAG_ID, "run_id": run.run_id}, headers=headers
        ).json()["leases"]
        query_s = 0.0
        for lease in leases:
            queries = httpx.get(f"{url}/v1/leases/{lease['id']}/queries", headers=headers)
            query_s += sum(q["duration_s"] or 0 for q in queries.json()["queries"])
        print(
            f"{policy} run {i + 1}: billed {billed:.1f} instance-s, queries {query_s:.2f} s, "
            f"wall {wall:.1f} s",
            flush=True,
        )
        out.append((billed, query_s, wall))
    return out


def instance_seconds(url: str) -> float:
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("pclease_instance_seconds_total{") or line.startswith(
            "pclease_instance_seconds{"
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until_only_idle(url: str, headers: dict[str, str]) -> None:
    """Contexts that stop soon are waited for; ones that idle for long are not."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        live = contexts(url, headers, ["starting", "running", "stopping", "idle"])
        if all(c["state"] == "idle" and c["stops_at"] and _left(c) > 60 for c in live):
            return
        time.sleep(0.5)
    raise SystemExit("contexts did not stop after the last run")


def idle_tail_s(url: str, headers: dict[str, str]) -> float:
    return sum(_left(c) for c in contexts(url, headers, ["idle"]))


def _left(context: dict[str, Any]) -> float:
    stops_at = datetime.fromisoformat(context["stops_at"])
    return max(0.0, (stops_at - datetime.now(UTC)).total_seconds())


def contexts(url: str, headers: dict[str, str], states: list[str]) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/v1/contexts", params={"state": states}, headers=headers)
    return list(response.json()["contexts"])


def report(results: dict[str, list[tuple[float, float, float]]], args: argparse.Namespace) -> None:
    rows = []
    for policy, runs in results.items():
        billed = [b for b, _, _ in runs]
        query = [q for _, q, _ in runs]
        wall = [w for _, _, w in runs]
        rows.append(
            f"| `{policy}` | {statistics.mean(billed):.1f} | {statistics.mean(query):.2f} | "
            f"{statistics.mean(billed) / max(statistics.mean(query), 1e-9):.0f}x | "
            f"{statistics.median(wall):.1f} s | {' / '.join(f'{b:.0f}' for b in billed)} |"
        )
    lines = [
        "",
        f"### {time.strftime('%Y-%m-%d')}: {args.runs} runs in a row per policy, boot "
        f"{args.boot_s:g} s, {platform.machine()} ({platform.python_version()})",
        "",
        "| policy | billed instance-s per run (mean) | query s per run (mean) | billed / query | "
        "run wall time (median) | billed per run |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        path = ROOT / "docs" / "benchmarks.md"
        content = path.read_text()
        heading = "## What a pipeline is billed for (`bench/billing_bench.py`)"
        if heading not in content:
            content += (
                f"\n{heading}\n\nThe seed pipeline's shape (two `small` tasks in parallel, "
                "then a join on `large`) on a real Airflow deployment, run several times in "
                "a row under three policies: pclease (shared contexts, the example's 5 s idle "
                "grace), a context per task started and stopped by the task, and shared "
                "contexts stopped by a fixed 10-minute idle timeout (Polars Cloud's minimum). "
                "Billed instance-seconds come from pclease's own ledger; the last run also "
                "carries the idle time left until its contexts stop.\n"
            )
        path.write_text(content + text + "\n")


if __name__ == "__main__":
    main()
