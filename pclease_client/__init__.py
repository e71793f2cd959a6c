"""The client side of pclease: lease compute and run Polars queries through the service.

Importable with only ``httpx`` (and ``polars`` for building plans); it never imports the
service. The Airflow provider builds on it.

::

    from pclease_client import PcleaseClient

    client = PcleaseClient("http://pclease:8040", token)
    with client.lease("large", holder={"dag_id": "etl"}) as lease:
        lease.remote(lf).sink_parquet("s3://bucket/out/data.parquet")
        df = lease.remote(other_lf).collect()
"""

from pclease_client.client import Lease, PcleaseClient, RemoteQuery
from pclease_client.errors import (
    LeaseLost,
    PcleaseClientError,
    PcleaseHTTPError,
    QueryFailed,
)
from pclease_client.plans import Submission, build_submission

__all__ = [
    "Lease",
    "LeaseLost",
    "PcleaseClient",
    "PcleaseClientError",
    "PcleaseHTTPError",
    "QueryFailed",
    "RemoteQuery",
    "Submission",
    "build_submission",
]
