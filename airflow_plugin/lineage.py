"""What a task's queries read and wrote, told to Airflow.

pclease answers every query with its lineage (``QueryInfo.inputs`` and ``outputs``: the
paths its plan scans and writes, read by the service off the plan). The provider tells
Airflow in two ways:

- the hook-level lineage collector (:func:`report`), as Airflow's own hooks do: the asset
  views and any hook-lineage reader (the OpenLineage provider is one) see the files;
- ``get_openlineage_facets_on_complete`` on the operators and ``@task.pclease``
  (:func:`openlineage_facets`), read by the OpenLineage provider when it is installed.

A local path ``/lake/x.parquet`` is the asset ``file:///lake/x.parquet`` and the
OpenLineage dataset ``file`` / ``/lake/x.parquet``; ``s3://bucket/key`` is the asset
``s3://bucket/key`` and the dataset ``s3://bucket`` / ``key`` (the naming of Airflow's
``common.io`` and Amazon providers).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from pclease_client import QueryInfo

log = logging.getLogger(__name__)


def asset_uri(path: str) -> str:
    """The Airflow asset URI of a path or URI a query read or wrote."""
    return f"file://{path}" if path.startswith("/") else path


def dataset_name(path: str) -> tuple[str, str]:
    """The OpenLineage (namespace, name) of a path or URI a query read or wrote."""
    if path.startswith("/"):
        return "file", path
    scheme, rest = path.split("://", 1) if "://" in path else ("file", path)
    authority, _, name = rest.partition("/")
    return f"{scheme}://{authority}", name


def inputs_outputs(queries: Iterable[QueryInfo]) -> tuple[list[str], list[str]]:
    """Every path the queries read and wrote, once each, in the order first seen; a file
    a query wrote and a later one read (an intermediate) is an output only."""
    inputs: dict[str, None] = {}
    outputs: dict[str, None] = {}
    for query in queries:
        for path in query.inputs:
            if path not in outputs:
                inputs[path] = None
        for path in query.outputs:
            outputs[path] = None
    return list(inputs), list(outputs)


def report(hook: Any, query: QueryInfo) -> None:
    """Tell Airflow's hook-level lineage collector what ``query`` read and wrote, on behalf
    of ``hook``. Never fails the task: lineage is an account of the work, not the work."""
    try:
        collector = _collector()
        for path in query.inputs:
            collector.add_input_asset(context=hook, uri=asset_uri(path))
        for path in query.outputs:
            collector.add_output_asset(context=hook, uri=asset_uri(path))
    except Exception:
        log.warning("pclease: could not report the lineage of query %s", query.id, exc_info=True)


def _collector() -> Any:
    from airflow.providers.common.compat.sdk import get_hook_lineage_collector

    return get_hook_lineage_collector()


def openlineage_facets(queries: Iterable[QueryInfo]) -> Any:
    """The ``OperatorLineage`` of the queries a task ran (what
    ``get_openlineage_facets_on_complete`` returns); None without the OpenLineage provider."""
    try:
        from airflow.providers.common.compat.openlineage.facet import Dataset
        from airflow.providers.openlineage.extractors import OperatorLineage
    except ImportError:
        return None
    inputs, outputs = inputs_outputs(queries)
    return OperatorLineage(
        inputs=[Dataset(*dataset_name(path)) for path in inputs],
        outputs=[Dataset(*dataset_name(path)) for path in outputs],
    )
