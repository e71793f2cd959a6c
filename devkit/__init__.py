"""Real pclease and Airflow processes on this machine, for the tests and the benchmarks.

::

    live.py         a ``pclease serve`` process (uvicorn) with its config file and CLI
    airflow_env.py  an Airflow 3 installation with its own home, metastore and connection

Not part of the shipped package; the tests and ``bench/`` both import it from the
repository root.
"""
