"""What ``pip install 'pclease[airflow]'`` puts on an Airflow worker's import path: the
client, the provider and the service's package, under names of their own; nothing
generically named (no ``service``, no ``migrations``)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheels")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (path,) = out.glob("pclease-*.whl")
    return zipfile.ZipFile(path)


def metadata(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_the_wheel_has_no_generically_named_top_level_module(wheel: zipfile.ZipFile) -> None:
    top_level = {name.split("/")[0] for name in wheel.namelist() if ".dist-info/" not in name}
    assert top_level == {"pclease_service", "pclease_client", "airflow_plugin"}


def test_the_provider_registers_itself_and_accepts_a_range_of_airflow(
    wheel: zipfile.ZipFile,
) -> None:
    entry_points = metadata(wheel, "entry_points.txt")
    assert "[apache_airflow_provider]\nprovider_info = airflow_plugin:get_provider_info" in (
        entry_points
    )
    assert "[airflow.plugins]\npclease = airflow_plugin.plugin:PcleasePlugin" in entry_points
    requires = Parser().parsestr(metadata(wheel, "METADATA")).get_all("Requires-Dist") or []
    assert 'apache-airflow<3.4,>=3.2.0; extra == "airflow"' in requires
