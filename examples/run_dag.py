"""Run one DAG once with Airflow's ``dag.test()`` and print how it went.

    python examples/run_dag.py examples/dags/pclease_seed_pipeline.py pclease_seed_pipeline

Airflow's configuration comes from the environment (``AIRFLOW_HOME`` and friends); run
``airflow db migrate`` first. The last line printed is a JSON summary of the run:
``{"dag_id", "run_id", "state", "tasks": {task_id: state}}``. The exit status is 0 when the
run succeeded and 1 otherwise (``dag.test()`` itself does not raise when a task fails).
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from typing import Any


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dag_file")
    parser.add_argument("dag_id")
    parser.add_argument("--conf", default="{}", help="the run's conf, as JSON")
    args = parser.parse_args()

    from airflow.sdk import DAG

    # The DAG file must keep its DAG in a module-level name (``dag = my_pipeline()``).
    namespace = runpy.run_path(args.dag_file)
    dags = {d.dag_id: d for d in namespace.values() if isinstance(d, DAG)}
    if args.dag_id not in dags:
        known = ", ".join(sorted(dags)) or "none"
        print(f"no DAG {args.dag_id!r} in {args.dag_file} (it has: {known})", file=sys.stderr)
        return 2
    dag_run = dags[args.dag_id].test(run_conf=json.loads(args.conf))
    summary = {
        "dag_id": dag_run.dag_id,
        "run_id": dag_run.run_id,
        "state": str(dag_run.state),
        "tasks": {_ti_name(ti): str(ti.state) for ti in dag_run.get_task_instances()},
    }
    print(json.dumps(summary))
    return 0 if summary["state"] == "success" else 1


def _ti_name(ti: Any) -> str:
    return ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"


if __name__ == "__main__":
    sys.exit(main())
