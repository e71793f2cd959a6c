"""The demo's Airflow half: start a real Airflow 3 deployment (scheduler with the
LocalExecutor, DAG processor, API server, triggerer, a PostgreSQL metastore made for it),
add the ``pclease_default`` connection with ``airflow connections add``, trigger the example DAG
through the REST API, and show what pclease saw while it ran: which tasks shared which
context, and how many leases held a context at once.

    python -m devkit.demo --url URL --token TOKEN --lake DIR --home DIR

``scripts/demo`` starts the service first and runs this.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from devkit.airflow_deployment import AirflowDeployment
from pclease_client import ContextState, LeaseInfo, LeaseState, PcleaseClient

ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "pclease_seed_pipeline"


class RefcountWatcher:
    """Samples every live context's refcount while the DAG runs (what the dashboard's
    overview shows live), remembering the highest and who held it then."""

    def __init__(self, client: PcleaseClient) -> None:
        self._client = client
        self._stop = threading.Event()
        self.highest: dict[str, tuple[int, str, list[str]]] = {}
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> RefcountWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self._sample()
            except Exception as exc:  # a sample lost; the next one tries again
                print(f"(could not read the contexts: {exc})")

    def _sample(self) -> None:
        live = self._client.list_contexts(state=[ContextState.STARTING, ContextState.RUNNING])
        for context in live:
            known = self.highest.get(context.id, (0, "", []))
            if context.refcount > known[0]:
                leases = self._client.list_leases(
                    context_id=context.id, state=[LeaseState.PENDING, LeaseState.ACTIVE]
                )
                tasks = sorted(str(lease.holder.get("task_id", "?")) for lease in leases)
                self.highest[context.id] = (context.refcount, context.profile, tasks)
                print(
                    f"  context {context.id[:8]} ({context.profile}): refcount "
                    f"{context.refcount}, held by {', '.join(tasks)}",
                    flush=True,
                )


def most_at_once(leases: list[LeaseInfo]) -> int:
    """The most leases that overlapped in time (from the service's own timestamps)."""
    edges = []
    for lease in leases:
        edges.append((lease.created_at, 1))
        if lease.ended_at is not None:
            edges.append((lease.ended_at, -1))
    held = best = 0
    for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
        held += step
        best = max(best, held)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="the pclease service")
    parser.add_argument("--token", required=True, help="a pclease token (lease and read)")
    parser.add_argument("--lake", required=True, type=Path)
    parser.add_argument("--home", required=True, type=Path, help="AIRFLOW_HOME")
    args = parser.parse_args()

    started = time.monotonic()
    host, port = args.url.removeprefix("http://").rsplit(":", 1)
    airflow = AirflowDeployment(
        args.home,
        ROOT / "examples" / "dags",
        env={"PCLEASE_DEMO_LAKE": str(args.lake), "AIRFLOW__PCLEASE__DASHBOARD_URL": args.url},
    )
    print(
        "== Airflow: migrating a new PostgreSQL metastore, starting the scheduler "
        "(LocalExecutor), the DAG processor, the API server and the triggerer"
    )
    with airflow.start(), PcleaseClient(args.url, args.token) as client:
        print(
            f"Airflow is up after {time.monotonic() - started:.0f} s: {airflow.url} "
            f"(logs: {args.home})"
        )
        airflow.add_connection(
            "pclease_default", "pclease", host=host, port=int(port), password=args.token
        )
        airflow.wait_for_dags(DAG_ID)
        print(f"\n== triggering {DAG_ID} through Airflow's REST API")
        with RefcountWatcher(client) as watcher:
            run = airflow.run_dag(DAG_ID)
        print(f"{run.run_id}: {run.state}")
        for task, state in run.tasks.items():
            print(f"  {task:<28} {state}")
        if run.state != "success":
            print(f"the run failed; the task logs are under {args.home / 'logs'}")
            return 1

        leases = client.list_leases(dag_id=DAG_ID, run_id=run.run_id)
        print("\n== contexts of the run (from pclease's leases)")
        by_context: dict[str, list[LeaseInfo]] = {}
        for lease in leases:
            by_context.setdefault(lease.context_id, []).append(lease)
        for context_id, held in by_context.items():
            tasks = ", ".join(sorted(str(lease.holder["task_id"]) for lease in held))
            print(
                f"context {context_id[:8]} ({held[0].profile}): {len(held)} leases, "
                f"up to {most_at_once(held)} at once: {tasks}; dashboard: "
                f"{args.url}/ui/contexts/{context_id}"
            )
        shared = max((entry[0] for entry in watcher.highest.values()), default=0)
        print(f"highest refcount seen while the run ran: {shared}")
        assert airflow.scheduler_alive(), "the scheduler died"
        print(f"\nthe Airflow part took {time.monotonic() - started:.0f} s; stopping Airflow")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
