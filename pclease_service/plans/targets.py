"""What a query produces: a ``collect`` result the service keeps, or a file sink."""

from __future__ import annotations

from enum import StrEnum


class QueryTarget(StrEnum):
    COLLECT = "collect"
    PARQUET = "parquet"
    CSV = "csv"
    IPC = "ipc"
    NDJSON = "ndjson"


#: The sink path the client attaches for ``collect`` (as Polars Cloud's own client does);
#: the backend redirects it to ``QuerySpec.result_path``.
IN_MEMORY_SINK = "<in-memory>"
