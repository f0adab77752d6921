"""compose.yaml: valid for Compose, and every image it pulls named in full (registry/name:tag).

podman resolves a short name such as ``prom/prometheus`` only through a search registry, which many
setups lack; a fully qualified name pulls the same image under docker and podman alike.
Validation needs PyYAML and a Compose (``docker compose`` v2, or ``docker-compose``); without them
these tests skip (``.ci/container`` installs both).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

from ._engine import ROOT

pytestmark = pytest.mark.container

COMPOSE_FILE = ROOT / "compose.yaml"


def _need(what: str) -> NoReturn:
    message = f"{what} not found: install it to check compose.yaml (.ci/container does)"
    if os.environ.get("NORMSERVE_REQUIRE_CONTAINER"):
        pytest.fail(message)
    pytest.skip(message)


def _load() -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        _need("PyYAML")
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


def _is_fully_qualified(ref: str) -> bool:
    first, sep, _ = ref.partition("/")
    return bool(sep) and ("." in first or ":" in first or first == "localhost")


def test_compose_file_pulls_fully_qualified_images() -> None:
    services = _load()["services"]
    pulled = {name: s["image"] for name, s in services.items() if "build" not in s}
    assert pulled, "compose.yaml pulls no image?"
    short = {name: ref for name, ref in pulled.items() if not _is_fully_qualified(ref)}
    assert not short, f"short image names (write docker.io/...): {short}"
    for name, s in services.items():  # what compose builds comes from this repository
        if "build" in s:
            assert s["build"]["context"] == ".", name
            assert (ROOT / s["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_compose_file_mounts_only_what_the_repository_has() -> None:
    for name, s in _load()["services"].items():
        for volume in s.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        v2 = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=60)
        if v2.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_validates_the_file(tmp_path: Path) -> None:
    data = _load()
    cmd = _compose_command()
    if cmd is None:
        _need("docker compose (or docker-compose)")
    version = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=60).stdout
    import yaml

    if "version 1." in version:
        # Compose 1.x predates the top-level `name` (the project name; later versions take it):
        # it validates the rest of the file
        data.pop("name", None)
    # the token file scripts/make-token writes is not in git: validate with a stand-in
    env = tmp_path / "normserve.env"
    env.write_text("NORMSERVE_AUTH_TOKENS=default " + "0" * 64 + "\n")
    data["services"]["normserve"]["env_file"] = [str(env)]
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [*cmd, "-f", str(path), "--project-directory", str(ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} config: {proc.stdout}{proc.stderr}"


def test_compose_runs_normserve_authenticated() -> None:
    service = _load()["services"]["normserve"]
    assert service["env_file"] == ["deploy/normserve.env"], service.get("env_file")
    environment = service.get("environment", {})
    assert "NORMSERVE_UNSAFE_EXPOSE_WITHOUT_AUTH" not in environment
    assert "NORMSERVE_AUTH_TOKENS" not in environment  # a secret never lives in compose.yaml
    made = subprocess.run(
        ["bash", str(ROOT / "scripts" / "make-token"), "--print"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    line, token = made.stdout.splitlines()
    tenant, _, value = line.removeprefix("NORMSERVE_AUTH_TOKENS=").partition(" ")
    assert tenant == "default" and value == token and len(token) == 64
