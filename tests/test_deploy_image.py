"""The Dockerfile and the image's healthcheck script. No Docker engine runs where these
tests run, so the image is not built here: the Dockerfile is linted (hadolint), read for
what the deployment files rely on, and its healthcheck script runs outside Docker."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy_support import COMPOSE_DIR, DEPLOY, ROOT, app_routes, parse_cli, render
from tests.live import LiveServer, free_port, write_config

DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = DEPLOY / "docker" / "healthcheck.py"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for word, rest in _instructions():
        if word == "FROM":
            name = rest.split()[-1] if " AS " in rest.upper() else str(len(stages))
            current = stages.setdefault(name, [])
        if current is not None:
            current.append((word, rest))
    return stages


def _final() -> list[tuple[str, str]]:
    return list(_stages().values())[-1]


def _one(stage: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in stage if w == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def _exec_form(value: str) -> list[str]:
    parsed = json.loads(value)
    assert isinstance(parsed, list)
    return [str(part) for part in parsed]


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint is missing from the venv: run scripts/bootstrap service,dev")
    result = subprocess.run(
        [str(hadolint), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_final_stage_is_slim_non_root_and_has_no_build_tools() -> None:
    args = dict(
        rest.split("=", 1) for word, rest in _instructions() if word == "ARG" and "=" in rest
    )
    stages = _stages()
    assert list(stages)[-1] == "service", "the service must be the default (last) target"
    final = stages["service"]
    base = _one(final, "FROM").split()[0]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base
    user = _one(final, "USER")
    assert user.split(":")[0] not in ("0", "root") and user.split(":")[0].isdigit()
    # The Kubernetes manifests run as the same uid the image was built for.
    deployment = next(d for d in render("production") if d["kind"] == "Deployment")
    assert (
        int(user.split(":")[0])
        == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    )
    runs = " ".join(rest for word, rest in final if word == "RUN")
    for tool in ("gcc", "build-essential", "g++", "make ", "pip install", "git"):
        assert tool not in runs, f"{tool} in the final stage"
    copies = [rest for word, rest in final if word == "COPY"]
    assert any(c.startswith("--from=build /opt/pclease ") for c in copies)


def test_entrypoint_command_healthcheck_and_port_agree_with_the_service() -> None:
    final = _final()
    entrypoint = _exec_form(_one(final, "ENTRYPOINT"))
    assert entrypoint[-1] == "pclease" and entrypoint[0].endswith("tini")
    command, params = parse_cli(_exec_form(_one(final, "CMD")))
    assert command == "serve" and params["host"] == "0.0.0.0"  # noqa: S104 (in a container)
    assert _one(final, "EXPOSE") == str(params["port"])
    assert _one(final, "STOPSIGNAL") == "SIGTERM"
    health = _one(final, "HEALTHCHECK")
    probe = _exec_form(health[health.index("CMD") + 3 :].strip())
    assert probe[1] == "/opt/pclease/healthcheck.py"
    url = probe[2]
    assert url == f"http://127.0.0.1:{params['port']}/healthz"
    assert "/healthz" in app_routes()
    copied = [rest.split() for word, rest in final if word == "COPY" and "--from" not in rest]
    assert [str(HEALTHCHECK.relative_to(ROOT)), probe[1]] in copied


def test_everything_copied_from_the_context_exists_and_is_not_dockerignored() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            bare = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, bare) or path.startswith(bare + "/"):
                result = not negate
        return result

    for word, rest in _instructions():
        if word != "COPY" or "--from" in rest:
            continue
        *sources, _target = shlex.split(rest)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not ignored(source.rstrip("/")), f"{source} is excluded by .dockerignore"
    assert ignored(".venv") and ignored("tests") and ignored("deploy/compose/secrets")


def test_the_compose_build_targets_are_stages() -> None:
    compose = yaml.safe_load((COMPOSE_DIR / "pclease.compose.yaml").read_text())
    blocks = [*compose["services"].values(), *(v for k, v in compose.items() if k[:2] == "x-")]
    targets = {block["build"]["target"] for block in blocks if "build" in block}
    assert targets == {"service", "airflow"}
    assert targets <= set(_stages())


def test_healthcheck_script_outside_docker(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "pclease.toml",
        {"data_dir": str(tmp_path / "data"), "backend": "memory"},
        {"small": {"cpus": 1, "memory_gb": 1}},
    )
    server = LiveServer(config, tmp_path / "serve.log").start()

    def check(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(HEALTHCHECK), url], capture_output=True, text=True, timeout=30
        )

    try:
        healthy = check(f"{server.url}/healthz")
        assert healthy.returncode == 0, healthy.stderr
        missing = check(f"{server.url}/no-such-page")
        assert missing.returncode == 1
        assert "answered 404" in missing.stderr
    finally:
        server.stop()
    down = check(f"http://127.0.0.1:{free_port()}/healthz")
    assert down.returncode == 1
    assert "unhealthy" in down.stderr
    bad = check("file:///etc/passwd")
    assert bad.returncode == 2
