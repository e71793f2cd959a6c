"""deploy/kubernetes: each overlay renders with ``kubectl kustomize``, every object passes
Kubernetes' own schema, and the manifests agree with the service (ports, probe paths,
environment names, the ConfigMap's TOML loaded through ``Settings``). No pod but pclease's
server can read the Polars Cloud service account, and only Airflow reaches the API."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from pclease_service.config import CONFIG_ENV_VAR, Settings
from tests.deploy.deploy_support import (
    POLARS_CLOUD_SECRET,
    ROOT,
    app_routes,
    load_deployed_settings,
    overlays,
    parse_cli,
    render,
    replica_stop_s,
    settings_field_for_env,
)

#: The oldest and a recent Kubernetes the manifests must be valid for.
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")
#: Objects from CRDs, which Kubernetes' own schemas do not cover; checked by hand below.
CUSTOM_KINDS = {"ServiceMonitor"}
SERVER_LABELS = {"app.kubernetes.io/name": "pclease", "app.kubernetes.io/component": "server"}
#: What the downward API gives a pod of the Deployment for metadata.name.
POD_NAME = "pclease-7c9d8f6b5d-x2x9z"

pytestmark = pytest.mark.parametrize("overlay", overlays())


def _one(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_specs(docs: tuple[dict[str, Any], ...]) -> list[tuple[str, dict[str, Any]]]:
    specs = []
    for d in docs:
        template = d.get("spec", {}).get("template")
        if template is not None:
            specs.append((f"{d['kind']}/{d['metadata']['name']}", template))
    return specs


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _server(docs: tuple[dict[str, Any], ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    deployment = _one(docs, "Deployment", "pclease")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    return deployment, next(c for c in containers if c["name"] == "pclease")


def _env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str]:
    """The container's variables (envFrom ConfigMaps, then env), secrets filled with
    values of the shape they must have."""
    stand_ins = {
        "PCLEASE_DATABASE_URL": "postgresql+psycopg://pclease:pw@db.example:5432/pclease",
        "PCLEASE_SESSION_SECRET": "s" * 16 + "e" * 16 + "0123456789",
        "AIRFLOW_TOKEN": "t" * 16 + "o" * 16 + "0123456789",
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "only ConfigMaps may be imported whole"
        env.update(_one(docs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "fieldRef" in var["valueFrom"]:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", var
            env[var["name"]] = POD_NAME
        else:
            assert var["name"] in stand_ins, f"no stand-in for secret variable {var['name']}"
            env[var["name"]] = stand_ins[var["name"]]
    return env


def _settings(
    docs: tuple[dict[str, Any], ...],
    pod: dict[str, Any],
    container: dict[str, Any],
    tmp_path: Path,
) -> Settings:
    """What this container's pclease reads: the mounted ConfigMap's TOML and its env."""
    env = _env(docs, container)
    config_path = env[CONFIG_ENV_VAR]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mount = next(
        m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")
    )
    config_map = volumes[mount["name"]]["configMap"]["name"]
    key = config_path[len(mount["mountPath"]) + 1 :]
    toml = _one(docs, "ConfigMap", config_map)["data"][key]
    return load_deployed_settings(toml, env, tmp_path)


def test_every_object_passes_the_kubernetes_schema(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Job", "ConfigMap", "Service", "PodDisruptionBudget"} <= kinds
    assert {"ServiceMonitor", "NetworkPolicy", "Namespace", "ServiceAccount"} <= kinds
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_misspelled_field(overlay: str) -> None:
    deployment = copy.deepcopy(_one(render(overlay), "Deployment", "pclease"))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_server_runs_replicas_on_the_port_and_probes_the_app_serves(
    overlay: str, tmp_path: Path
) -> None:
    docs = render(overlay)
    deployment, container = _server(docs)
    assert deployment["spec"]["replicas"] >= 2
    assert "command" not in container, "the image's entrypoint (tini, pclease) must stay"
    command, params = parse_cli(container["args"])
    assert command == "serve"
    assert params["no_migrate"] is True, "the migration Job migrates; replicas must not race it"
    assert params["host"] == "0.0.0.0"  # noqa: S104 (in a pod)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == params["port"]

    routes = app_routes()
    probes = {k: container[k]["httpGet"] for k in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    startup = container["startupProbe"]["httpGet"]
    for probe in [*probes.values(), startup]:
        assert probe["path"] in routes
        assert probe["port"] in ports

    service = _one(docs, "Service", "pclease")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    pdb = _one(docs, "PodDisruptionBudget", "pclease")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    monitor = _one(docs, "ServiceMonitor", "pclease")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and "/metrics" in routes

    requests = container["resources"]["requests"]
    assert {"cpu", "memory"} <= requests.keys()
    assert "memory" in container["resources"]["limits"]


def test_environment_and_config_are_what_the_service_reads(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    deployment, container = _server(docs)
    for name in _env(docs, container):
        assert name == CONFIG_ENV_VAR or settings_field_for_env(name), (
            f"{name} is not a setting pclease reads (docs/configuration.md)"
        )
    settings = _settings(docs, deployment["spec"]["template"], container, tmp_path)
    assert settings.backend.value == "polars_cloud"
    # Each replica its own stable id: the pod's name, which the service accepts.
    [replica_id] = [v for v in container["env"] if v["name"] == "PCLEASE_REPLICA_ID"]
    assert settings_field_for_env(replica_id["name"])
    assert replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert settings.replica_id == POD_NAME
    # What replicas share is shared: PostgreSQL, and plans and results in storage every
    # replica reaches (not a directory of its own pod).
    assert settings.database_url is not None
    assert settings.database_url.startswith("postgresql")
    assert settings.storage.kind.value in {"database", "s3"}

    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    # data_dir (this replica's scratch files) is writable although the root filesystem
    # is not.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    data = mounts[str(settings.data_dir)]
    assert "emptyDir" in volumes[data["name"]] or "persistentVolumeClaim" in volumes[data["name"]]
    assert not data.get("readOnly", False)

    credentials = settings.polars_cloud.credentials
    assert credentials.source.value == "file"
    for path in (credentials.client_id_file, credentials.client_secret_file):
        assert path is not None
        mount = mounts[str(path.parent)]
        assert "subPath" not in mount, "a subPath mount is never updated: rotation would fail"
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == POLARS_CLOUD_SECRET
        assert path.name in {"client_id", "client_secret"}
    docs_text = (ROOT / "docs" / "deploy.md").read_text()
    assert f"create secret generic {POLARS_CLOUD_SECRET}" in docs_text
    assert "--from-file=client_id=" in docs_text and "--from-file=client_secret=" in docs_text

    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert grace > float(pre_stop[1]) + replica_stop_s(settings), (
        "terminationGracePeriodSeconds must outlast preStop plus what a replica does "
        "between SIGTERM and its exit (pclease_service.serving.stop_budget_s)"
    )
    assert f"terminationGracePeriodSeconds ({grace})" in _config_text(), (
        "the ConfigMap's TOML names the grace period"
    )
    assert settings.instance_name != "pclease", "each deployment names its own instance"


def _config_text() -> str:
    return (ROOT / "deploy" / "kubernetes" / "base" / "pclease.toml").read_text()


def test_the_migration_job_migrates_and_provisions_the_airflow_token(
    overlay: str, tmp_path: Path
) -> None:
    docs = render(overlay)
    job = _one(docs, "Job", "pclease-migrate")
    pod = job["spec"]["template"]
    [migrate] = pod["spec"]["initContainers"]
    assert parse_cli(migrate["args"])[0] == "db upgrade"
    [provision] = pod["spec"]["containers"]
    command, params = parse_cli(provision["args"])
    assert command == "token create"
    assert params["scopes"] == ("lease",)
    env_names = {v["name"] for v in provision["env"]}
    assert params["value_env"] in env_names
    assert not settings_field_for_env(params["value_env"])
    token_ref = next(v for v in provision["env"] if v["name"] == params["value_env"])
    assert token_ref["valueFrom"]["secretKeyRef"]["name"] == "pclease-airflow-token"
    deployment, server = _server(docs)
    server_settings = _settings(docs, deployment["spec"]["template"], server, tmp_path)
    for container in (migrate, provision):
        names = set(_env(docs, container)) - {params["value_env"]}
        assert all(n == CONFIG_ENV_VAR or settings_field_for_env(n) for n in names)
        settings = _settings(docs, pod, container, tmp_path)
        assert settings.database_url == server_settings.database_url


def test_only_the_pclease_server_can_read_the_polars_cloud_secret(overlay: str) -> None:
    docs = render(overlay)
    namespaces = {d["metadata"].get("namespace") for d in docs} - {None}
    assert len(namespaces) == 1 and "airflow" not in namespaces
    assert not [d for d in docs if d["kind"] in {"Role", "RoleBinding", "ClusterRoleBinding"}]
    readers = []
    for where, pod in _pod_specs(docs):
        secret_volumes = {
            v["name"]
            for v in pod["spec"].get("volumes", [])
            if v.get("secret", {}).get("secretName") == POLARS_CLOUD_SECRET
            or any(
                s.get("secret", {}).get("name") == POLARS_CLOUD_SECRET
                for s in v.get("projected", {}).get("sources", [])
            )
        }
        for container in _containers(pod):
            uses = {m["name"] for m in container.get("volumeMounts", [])} & secret_volumes
            uses |= {
                v["name"]
                for v in container.get("env", [])
                if v.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == POLARS_CLOUD_SECRET
            }
            uses |= {
                "envFrom"
                for e in container.get("envFrom", [])
                if e.get("secretRef", {}).get("name") == POLARS_CLOUD_SECRET
            }
            if uses:
                readers.append((where, container["name"], pod["metadata"]["labels"]))
        assert pod["spec"].get("automountServiceAccountToken") is False, where
    assert readers, "the pclease server must mount the Polars Cloud secret"
    for where, container, labels in readers:
        assert (where, container) == ("Deployment/pclease", "pclease")
        assert SERVER_LABELS.items() <= labels.items()


def test_only_airflow_and_prometheus_reach_the_api(overlay: str) -> None:
    docs = render(overlay)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and "ingress" not in p["spec"]]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"], "a default deny is missing"
    _, container = _server(docs)
    labels = _one(docs, "Deployment", "pclease")["spec"]["template"]["metadata"]["labels"]
    [api] = [p for p in policies if p["spec"]["podSelector"] != {}]
    assert api["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    allowed = []
    for rule in api["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == ["http"]
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            assert peer.get("namespaceSelector") and peer.get("podSelector"), (
                "each peer names both a namespace and its pods"
            )
            allowed.append(
                (
                    peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
                    peer["podSelector"]["matchLabels"],
                )
            )
    assert allowed == [
        ("airflow", {"tier": "airflow"}),
        ("monitoring", {"app.kubernetes.io/name": "prometheus"}),
    ]
    assert container["ports"][0]["name"] == "http"
