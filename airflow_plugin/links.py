"""The extra link on every pclease task: its lease on the pclease dashboard.

Airflow 3's API server does not run operator code: it shows the URL a task stored in XCom
under the link's ``xcom_key`` while it ran. :func:`persist_lease_link` stores it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk import BaseOperatorLink

LEASE_XCOM_KEY = "pclease_lease_id"


class PcleaseLeaseLink(BaseOperatorLink):
    """``pclease lease``: the task's lease (holder, context, queries, cost) on the dashboard."""

    name = "pclease lease"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        # Only called in a task process; the API server reads the stored URL instead.
        from airflow.sdk.execution_time.xcom import XCom

        value = XCom.get_value(ti_key=ti_key, key=self.xcom_key)
        return str(value) if value else ""


def persist_lease_link(context: Mapping[str, Any], lease_id: str, url: str) -> None:
    """Record the running task's lease id and its dashboard URL (the extra link)."""
    ti = context["ti"]
    ti.xcom_push(key=LEASE_XCOM_KEY, value=lease_id)
    ti.xcom_push(key=PcleaseLeaseLink().xcom_key, value=url)
