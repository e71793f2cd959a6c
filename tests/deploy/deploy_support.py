"""What the deployment tests check the files in ``deploy/`` against: the service itself.

The ports, probe paths, environment names and config keys in the Dockerfile, the compose
file and the Kubernetes manifests are checked against what pclease really reads: the
routes of the FastAPI app, the fields of ``Settings`` (the TOML loaded through
``load_settings``), and the ``pclease`` command's own click parser.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import pytest
from pydantic import BaseModel

from pclease_service.api.app import create_app
from pclease_service.backends import backend_capabilities
from pclease_service.cli import main as pclease_cli
from pclease_service.config import CONFIG_ENV_VAR, Settings, load_settings
from pclease_service.runtime import Service
from pclease_service.serving import stop_budget_s

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
COMPOSE_DIR = DEPLOY / "compose"
#: The Polars Cloud service account: the one secret no Airflow container may read.
POLARS_CLOUD_SECRET = "pclease-polars-cloud"


@functools.cache
def app_routes() -> frozenset[str]:
    """Every path the service answers, from the real app."""
    with tempfile.TemporaryDirectory() as scratch:
        settings = Settings(
            backend="memory",
            data_dir=Path(scratch),
            profiles={"small": {"cpus": 1, "memory_gb": 1}},
        )
        service = Service(settings, run_reconciler=False)
        try:
            app = create_app(service)
            return frozenset(getattr(route, "path", "") for route in app.routes)
        finally:
            service.engine.dispose()


def parse_cli(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse a ``pclease`` command line with the real click command; returns the command's
    dotted name (``serve``, ``db upgrade``, ``token create``) and its parameters. A
    misspelled option or command fails here as it would in the container."""
    group: click.Command = pclease_cli
    names: list[str] = []
    rest = list(args)
    while isinstance(group, click.Group):
        assert rest, f"pclease {' '.join(args)}: no command after {' '.join(names)}"
        sub = group.get_command(click.Context(group), rest[0])
        assert sub is not None, f"pclease has no command {' '.join([*names, rest[0]])}"
        names.append(rest.pop(0))
        group = sub
    ctx = group.make_context(" ".join(names), rest)
    return " ".join(names), dict(ctx.params)


def settings_field_for_env(name: str) -> bool:
    """Whether ``name`` is an environment variable ``Settings`` reads (PCLEASE_X, nested
    PCLEASE_A__B), checked against the model's fields."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    delimiter = str(Settings.model_config.get("env_nested_delimiter", "__"))
    if not name.startswith(prefix):
        return False
    parts = name[len(prefix) :].lower().split(delimiter)
    model: type[BaseModel] = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i == len(parts) - 1:
            return True
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return False
        model = annotation
    return False


@contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Exactly these PCLEASE_* variables (and no others) while loading settings."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("PCLEASE_")}
    for key in saved:
        del os.environ[key]
    os.environ.update(values)
    try:
        yield
    finally:
        for key in values:
            os.environ.pop(key, None)
        os.environ.update(saved)


def load_deployed_settings(toml_text: str, env: Mapping[str, str], tmp_path: Path) -> Settings:
    """The settings a container gets from this TOML and these variables, loaded for real."""
    config = tmp_path / f"pclease-{uuid.uuid4().hex[:8]}.toml"
    config.write_text(toml_text)
    wanted = {k: v for k, v in env.items() if k.startswith("PCLEASE_") and k != CONFIG_ENV_VAR}
    with environment(wanted):
        return load_settings(config)


def replica_stop_s(settings: Settings) -> float:
    """How long a replica with these settings may take from SIGTERM to exit, by the
    service's own rule (long-polls and waiting lease requests end when it begins)."""
    return stop_budget_s(settings, backend_capabilities(settings.backend))


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl is not on PATH: the deployment tests render deploy/kubernetes with "
            "`kubectl kustomize` (kubectl 1.27 or newer, which bundles kustomize v5). "
            "Install kubectl and run the tests again.",
            pytrace=False,
        )
    return path


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    import yaml

    result = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize overlays/{overlay} failed:\n{result.stderr}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def overlays() -> list[str]:
    return sorted(p.name for p in (KUSTOMIZE / "overlays").iterdir() if p.is_dir())


# -- Compose: what `docker compose -f a -f b` does with the files, as far as we rely on it --

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)"
    r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def compose_variables(text: str) -> dict[str, str | None]:
    """Variables a compose file interpolates: name -> its operator (``:-``, ``:?``...)."""
    found: dict[str, str | None] = {}
    for m in _VARIABLE.finditer(text):
        name = m.group("braced") or m.group("plain")
        if name:
            found.setdefault(name, m.group("op"))
    return found


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation of ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}`` and
    ``$$`` in every string of a loaded compose document."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        unset = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset:
            return arg
        if op in (":?", "?") and unset:
            raise MissingVariable(f"{name}: {arg}")
        return current or ""

    return _VARIABLE.sub(one, value)


def _normalise_environment(env: Any) -> dict[str, Any]:
    if env is None:
        return {}
    if isinstance(env, dict):
        return dict(env)
    return dict(item.split("=", 1) if "=" in item else (item, None) for item in env)


def _merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [v for v in override if v not in base]
    return override


def merge_compose(*documents: dict[str, Any]) -> dict[str, Any]:
    """Merge compose files the way ``-f a -f b`` does for the keys used here: services by
    name, mappings key by key (environment included), sequences appended, scalars
    replaced. Anchors were already expanded per file by the YAML loader, as Compose does."""
    merged: dict[str, Any] = {}
    for doc in documents:
        doc = dict(doc)
        for service in (doc.get("services") or {}).values():
            if "environment" in service:
                service["environment"] = _normalise_environment(service["environment"])
        merged = _merge(merged, doc)
    return merged
