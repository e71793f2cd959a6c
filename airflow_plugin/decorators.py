"""``@task.pclease``: a TaskFlow task that runs inside a pclease lease.

::

    @task.pclease(profile="large")
    def join_datasets(lease, left: str, right: str) -> int:
        lf = pl.scan_parquet(left).join(pl.scan_parquet(right), on="id")
        return lease.remote(lf).sink_parquet(out).rows

The function gets the lease as its first argument, which must be called ``lease``. The
lease is taken before the
function runs, heartbeated while it runs, and released when it returns or raises, when
the task is killed (``on_kill``), by its watchdog process within seconds when the task
process dies (even by SIGKILL), and, as a last resort, by the service-side TTL.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from airflow.providers.common.compat.sdk import DecoratedOperator, task_decorator_factory
from airflow.providers.standard.operators.python import PythonOperator

from airflow_plugin.hooks import PcleaseHook, TaskLease
from airflow_plugin.links import PcleaseLeaseLink
from airflow_plugin.operators import ReportsLineage, SerializesConnId, _LeaseHolder, task_lease
from pclease_client import QueryInfo

LEASE_ARG = "lease"
_current_lease: ContextVar[TaskLease | None] = ContextVar("pclease_task_lease", default=None)


class _PcleaseDecoratedOperator(
    ReportsLineage, SerializesConnId, DecoratedOperator, PythonOperator
):
    custom_operator_name = "@task.pclease"
    template_fields: Sequence[str] = (*PythonOperator.template_fields, "profile")
    operator_extra_links = (PcleaseLeaseLink(),)
    ui_color = "#d7e9f7"

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Any,
        op_kwargs: Any,
        profile: str,
        pclease_conn_id: str = PcleaseHook.default_conn_name,
        ttl_s: float | None = None,
        start_timeout_s: float = 900.0,
        **kwargs: Any,
    ) -> None:
        python_callable = _lease_injecting(python_callable)
        super().__init__(
            kwargs_to_upstream={
                "python_callable": python_callable,
                "op_args": op_args,
                "op_kwargs": op_kwargs,
            },
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )
        self.profile = profile
        self.pclease_conn_id = pclease_conn_id
        self.ttl_s = ttl_s
        self.start_timeout_s = start_timeout_s
        self._holding = _LeaseHolder()
        self._queries: list[QueryInfo] = []

    def execute(self, context: Any) -> Any:
        with task_lease(self, context) as lease:
            token = _current_lease.set(lease)
            try:
                return super().execute(context)
            finally:
                _current_lease.reset(token)

    def on_kill(self) -> None:
        self._holding.release(self.log)


def _lease_injecting(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` without its first parameter, ``lease``, which is passed in at run time.

    Airflow checks a task's arguments against its function's signature when the DAG is
    parsed, and fills context keys (``params``, ``ti``...) by name when it runs; both must
    see the signature without ``lease``.
    """
    signature = inspect.signature(function)
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].name != LEASE_ARG:
        raise TypeError(
            f"@task.pclease function {function.__name__}() must take {LEASE_ARG!r} as its "
            f"first parameter: def {function.__name__}({LEASE_ARG}, ...)"
        )

    @functools.wraps(function)
    def with_lease(*args: Any, **kwargs: Any) -> Any:
        lease = _current_lease.get()
        if lease is None:
            raise RuntimeError(f"{function.__name__}() runs only as a @task.pclease task")
        return function(lease, *args, **kwargs)

    with_lease.__signature__ = signature.replace(parameters=parameters[1:])  # type: ignore[attr-defined]
    return with_lease


def pclease_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Wrap a function into a task that runs inside a lease of ``profile``.

    :param profile: the pclease compute profile (required)
    :param pclease_conn_id: the Airflow connection to pclease (``pclease_default``)
    :param ttl_s: the lease TTL (the service's default when None)
    :param start_timeout_s: how long to wait for a cold context to start
    """
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_PcleaseDecoratedOperator,
        **kwargs,
    )
