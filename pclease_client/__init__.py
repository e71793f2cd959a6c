"""The client side of pclease: lease compute and run Polars queries through the service.

Importable with only ``httpx`` (and ``polars`` for building plans); it never imports the
service. The Airflow provider builds on it.

::

    from pclease_client import PcleaseClient

    with PcleaseClient("http://pclease:8040", token) as client:
        with client.lease("large", holder={"dag_id": "etl"}) as lease:
            written = lease.remote(lf).sink_parquet("s3://bucket/out/data.parquet")
            print(written.rows, written.duration_s)
            df = lease.remote(other_lf).collect()
        running = client.list_contexts(state=[ContextState.RUNNING])

The modules, one idea each:

- :mod:`~pclease_client.client`: :class:`PcleaseClient`, a method per route of the API
- :mod:`~pclease_client.aio`: :class:`AsyncPcleaseClient` and :class:`AsyncLease`, the same
  over ``httpx.AsyncClient`` (heartbeats in an asyncio task: an Airflow triggerer)
- :mod:`~pclease_client.lease`: :class:`Lease` (heartbeats, its end noticed at once),
  :class:`RemoteQuery` (``lease.remote(lf).sink_parquet(...)``) and :class:`LeaseRef` (a
  lease handed from one holder to another, without its token)
- :mod:`~pclease_client.models`: the answers, as frozen dataclasses
- :mod:`~pclease_client.states`: the state enums and stop kinds
- :mod:`~pclease_client.errors`: the exception tree, one class per error code
- :mod:`~pclease_client.calls`: every request as data, and the retry policy (no I/O)
- :mod:`~pclease_client.plans`: a LazyFrame into a submission
- :mod:`~pclease_client.watchdog`: releases a lease when its process dies
- :mod:`~pclease_client.testing`: a fake service for the tests of code that uses this
"""

from pclease_client.aio import AsyncLease, AsyncPcleaseClient, AsyncRemoteQuery
from pclease_client.client import PcleaseClient
from pclease_client.errors import (
    ApiError,
    BudgetExhausted,
    CapacityExhausted,
    LeaseClosed,
    LeaseEnded,
    LeaseLost,
    PcleaseClientError,
    QueryFailed,
    QuotaExceeded,
    QuotaName,
    QuotaUse,
    RequestFailed,
)
from pclease_client.lease import HandleState, Lease, LeaseRef, RemoteQuery
from pclease_client.models import (
    ContextInfo,
    DistributedInfo,
    EventInfo,
    LeaseInfo,
    ProfileInfo,
    QueryInfo,
)
from pclease_client.plans import Submission, build_submission
from pclease_client.states import ContextState, LeaseState, QueryState, StopKind

__all__ = [
    "ApiError",
    "AsyncLease",
    "AsyncPcleaseClient",
    "AsyncRemoteQuery",
    "BudgetExhausted",
    "CapacityExhausted",
    "ContextInfo",
    "ContextState",
    "DistributedInfo",
    "EventInfo",
    "HandleState",
    "Lease",
    "LeaseClosed",
    "LeaseEnded",
    "LeaseInfo",
    "LeaseLost",
    "LeaseRef",
    "LeaseState",
    "PcleaseClient",
    "PcleaseClientError",
    "ProfileInfo",
    "QueryFailed",
    "QueryInfo",
    "QueryState",
    "QuotaExceeded",
    "QuotaName",
    "QuotaUse",
    "RemoteQuery",
    "RequestFailed",
    "StopKind",
    "Submission",
    "build_submission",
]
