"""What the two distributions put on an import path: ``pclease`` (what an Airflow worker
installs as ``pclease[airflow]``) holds the client and the provider only; the service and
its migrations come with ``pclease-service`` (the ``service`` extra)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, zipfile.ZipFile]:
    out = tmp_path_factory.mktemp("wheels")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out)]
    subprocess.run(
        [*build, ".", "./packaging/pclease-service"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    found = {path.name.split("-")[0]: zipfile.ZipFile(path) for path in out.glob("*.whl")}
    assert set(found) == {"pclease", "pclease_service"}
    return found


def top_level(wheel: zipfile.ZipFile) -> set[str]:
    return {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}


def metadata(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_the_airflow_side_gets_the_client_and_the_provider_only(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    wheel = wheels["pclease"]
    assert top_level(wheel) == {"pclease_client", "airflow_plugin"}
    entry_points = metadata(wheel, "entry_points.txt")
    assert "[apache_airflow_provider]\nprovider_info = airflow_plugin:get_provider_info" in (
        entry_points
    )
    assert "[airflow.plugins]\npclease = airflow_plugin.plugin:PcleasePlugin" in entry_points
    requires = Parser().parsestr(metadata(wheel, "METADATA")).get_all("Requires-Dist") or []
    assert 'apache-airflow<3.4,>=3.2.0; extra == "airflow"' in requires
    assert 'pclease-service==0.1.0; extra == "service"' in requires


def test_the_service_distribution_has_the_service_and_its_migrations(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    wheel = wheels["pclease_service"]
    assert top_level(wheel) == {"service", "migrations"}
    names = set(wheel.namelist())
    assert {"migrations/script.py.mako", "migrations/env.py"} <= names
    assert any(name.startswith("migrations/versions/0001_") for name in names)
    assert "service/dashboard/templates/overview.html" in names
    assert "service/dashboard/static/dashboard.css" in names
    assert "pclease = service.cli:main" in metadata(wheel, "entry_points.txt")
