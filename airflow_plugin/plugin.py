"""The Airflow plugin half of the provider: UI links to the pclease dashboard and the
listener. Registered through the ``airflow.plugins`` entry point, since Airflow does not
load a provider's plugins by itself.

The dashboard address comes from Airflow's configuration (``[pclease] dashboard_url``, or
``AIRFLOW__PCLEASE__DASHBOARD_URL``), because the API server builds its navigation before
any connection is looked up.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airflow_plugin import listener
from airflow_plugin.links import PcleaseLeaseLink


def dashboard_url() -> str:
    from airflow.configuration import conf

    url = conf.get("pclease", "dashboard_url", fallback="http://127.0.0.1:8040")
    return str(url).rstrip("/")


def _external_views() -> list[dict[str, str]]:
    base = dashboard_url()
    return [
        {"name": "pclease", "href": f"{base}/ui/", "destination": "nav", "category": "browse"},
        {
            "name": "pclease leases",
            "href": f"{base}/ui/runs?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
            "destination": "dag_run",
        },
        {
            "name": "pclease runs",
            "href": f"{base}/ui/runs?dag_id={{DAG_ID}}",
            "destination": "dag",
        },
    ]


class PcleasePlugin(AirflowPlugin):
    name = "pclease"
    listeners = [listener]  # noqa: RUF012 (Airflow reads these class attributes)
    operator_extra_links = [PcleaseLeaseLink()]  # noqa: RUF012
    external_views = _external_views()
