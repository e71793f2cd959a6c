"""Real pclease and Airflow processes on this machine, for the tests and the benchmarks.

::

    live.py         a ``pclease serve`` process (uvicorn) with its config file and CLI
    airflow_env.py  an Airflow 3 installation with its own home, metastore and connection,
                    for ``dag.test()`` runs
    airflow_deployment.py  a real Airflow 3 deployment: scheduler (LocalExecutor),
                    dag-processor and api-server as processes on a PostgreSQL metastore
    demo.py         what ``scripts/demo`` runs on that deployment

Not part of the shipped package; the tests and ``bench/`` both import it from the
repository root.
"""
