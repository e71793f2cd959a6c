"""pclease's Airflow 3 provider: lease Polars compute and run Polars queries from DAGs.

Registered with Airflow through two entry points: ``apache_airflow_provider``
(:func:`get_provider_info`: the connection type and its form, the hook, the operators,
``@task.pclease``, the extra link, the ``[pclease]`` configuration section) and
``airflow.plugins`` (:class:`~airflow_plugin.plugin.PcleasePlugin`: the listener and the UI
links). The plugin is deliberately not listed in the provider info as well: Airflow loads
entry-point plugins always and provider-info plugins only with
``[core] lazy_discover_providers = False``, where listing it twice would register it twice.

The Airflow side holds a pclease token only, never Polars Cloud credentials.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

#: How Airflow's connection form shows a ``pclease`` connection.
UI_FIELD_BEHAVIOUR: dict[str, Any] = {
    "hidden_fields": ["login", "extra"],
    "relabeling": {"schema": "Scheme", "password": "pclease token"},
    "placeholders": {
        "host": "pclease.example.com or https://pclease.example.com",
        "port": "8040",
        "schema": "http or https",
        "password": "a token from `pclease token create` (scopes: lease, read)",
    },
}


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "pclease",
        "name": "pclease",
        "description": "Lease Polars Cloud compute through pclease and run Polars queries on it.",
        "versions": [__version__],
        "integrations": [
            {
                "integration-name": "pclease",
                "tags": ["service"],
            }
        ],
        "operators": [
            {"integration-name": "pclease", "python-modules": ["airflow_plugin.operators"]}
        ],
        "hooks": [{"integration-name": "pclease", "python-modules": ["airflow_plugin.hooks"]}],
        "triggers": [
            {"integration-name": "pclease", "python-modules": ["airflow_plugin.triggers"]}
        ],
        "connection-types": [
            {
                "hook-class-name": "airflow_plugin.hooks.PcleaseHook",
                "hook-name": "pclease",
                "connection-type": "pclease",
                "conn-fields": {
                    "verify_tls": {
                        "label": "Verify TLS certificates",
                        "schema": {"type": ["boolean", "null"], "default": True},
                    },
                    "ca_bundle": {
                        "label": "CA bundle path",
                        "schema": {"type": ["string", "null"]},
                        "description": "A PEM file to verify the service's certificate with.",
                    },
                    "timeout_s": {
                        "label": "Request timeout (seconds)",
                        "schema": {"type": ["number", "null"], "default": 30},
                    },
                    "dashboard_url": {
                        "label": "Dashboard URL",
                        "schema": {"type": ["string", "null"]},
                        "description": "Where users reach the dashboard, if not the API address.",
                    },
                },
                "ui-field-behaviour": {
                    key.replace("_", "-"): value for key, value in UI_FIELD_BEHAVIOUR.items()
                },
            }
        ],
        "task-decorators": [
            {"name": "pclease", "class-name": "airflow_plugin.decorators.pclease_task"}
        ],
        "extra-links": ["airflow_plugin.links.PcleaseLeaseLink"],
        "config": {
            "pclease": {
                "description": "The pclease provider.",
                "options": {
                    "dashboard_url": {
                        "description": "The pclease dashboard's address, for Airflow's "
                        "navigation and DAG-run views.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "https://pclease.example.com",
                        "default": "http://127.0.0.1:8040",
                    },
                    "default_deferrable": {
                        "description": "Whether pclease's operators defer (free their worker "
                        "slot while a context boots and while a query runs) unless a task "
                        "says otherwise. Unset: [operators] default_deferrable decides.",
                        "version_added": "0.2.0",
                        "type": "boolean",
                        "example": "True",
                        "default": None,
                    },
                },
            }
        },
    }
