"""compose.yaml: valid for Compose, and every image it pulls named in full (registry/name:tag).

podman resolves a short name such as ``prom/prometheus`` only through a search registry, which many
setups lack; a fully qualified name pulls the same image under docker and podman alike.
Validation needs PyYAML and a Compose (``docker compose`` v2, or ``docker-compose``); without them
these tests skip (``.ci/container`` installs both).

The ``replicas`` profile adds three normserve replicas sharing a Redis (built from Debian's
``redis-server`` package: no Redis image is pulled) and leaves the default services as they were.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, NoReturn

import pytest

from ._engine import ROOT, Engine

pytestmark = pytest.mark.container

COMPOSE_FILE = ROOT / "compose.yaml"
DEFAULT_SERVICES = {"normserve", "prometheus", "grafana"}
REPLICAS = ("normserve-a", "normserve-b", "normserve-c")


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
            context = (ROOT / s["build"]["context"]).resolve()
            assert context.is_relative_to(ROOT), name
            assert (context / s["build"].get("dockerfile", "Dockerfile")).is_file(), name


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


@pytest.mark.parametrize("profile", [None, "replicas"])
def test_compose_validates_the_file(tmp_path: Path, profile: str | None) -> None:
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
    for service in data["services"].values():
        if "env_file" in service:
            service["env_file"] = [str(env)]
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(data))
    profiles = ["--profile", profile] if profile else []
    proc = subprocess.run(
        [*cmd, *profiles, "-f", str(path), "--project-directory", str(ROOT), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{' '.join(cmd)} config: {proc.stdout}{proc.stderr}"


def test_compose_runs_normserve_authenticated() -> None:
    services = _load()["services"]
    for name in ("normserve", *REPLICAS):
        service = services[name]
        assert service["env_file"] == ["deploy/normserve.env"], (name, service.get("env_file"))
        environment = service.get("environment", {})
        assert "NORMSERVE_UNSAFE_EXPOSE_WITHOUT_AUTH" not in environment, name
        assert "NORMSERVE_AUTH_TOKENS" not in environment, name  # never a secret in compose.yaml
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


# ---- the `replicas` profile -------------------------------------------------------------------


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0}
    for unit in sorted(units, key=len, reverse=True):
        if duration.endswith(unit):
            return float(duration.removesuffix(unit)) * units[unit]
    return float(duration)


def test_compose_default_services_stay_as_they_were() -> None:
    services = _load()["services"]
    unprofiled = {name for name, s in services.items() if not s.get("profiles")}
    assert unprofiled == DEFAULT_SERVICES  # `docker compose up` starts what it started before
    for name, s in services.items():
        if name not in DEFAULT_SERVICES:
            assert s["profiles"] == ["replicas"], name
    # the default normserve keeps its memory store: the profile sets Redis on its replicas only
    assert "NORMSERVE_STORE" not in services["normserve"].get("environment", {})


def test_compose_replicas_share_one_redis() -> None:
    data = _load()
    services = data["services"]
    assert {n for n, s in services.items() if "replicas" in s.get("profiles", [])} == {
        "redis",
        *REPLICAS,
    }
    default = services["normserve"]
    host_ports: list[str] = []
    for name in REPLICAS:
        replica = services[name]
        # the very image the default service builds, from the same build arguments
        assert replica["image"] == default["image"], name
        assert replica["build"] == default["build"], name
        environment = replica["environment"]
        assert environment["NORMSERVE_STORE"] == "redis://redis:6379/0", name
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy", name
        grace = float(environment["NORMSERVE_GRACE_SECONDS"])
        assert _seconds(replica["stop_grace_period"]) > grace, name  # drains, then exits 0
        assert "normserve-replicas" in replica["networks"]["default"]["aliases"], name
        for mapping in replica["ports"]:  # reachable from this host only
            assert mapping.startswith("127.0.0.1:"), (name, mapping)
            host_ports.append(mapping.rsplit(":", 2)[1])
    taken = [m.rsplit(":", 2)[1] for s in services.values() for m in s.get("ports", [])]
    assert len(taken) == len(set(taken)), f"a host port used twice: {sorted(taken)}"
    assert len(host_ports) == 2 * len(REPLICAS)


def test_compose_redis_keeps_its_aof_on_a_named_volume() -> None:
    data = _load()
    redis = data["services"]["redis"]
    assert "ports" not in redis  # no password: only the compose network reaches it
    options = [str(c) for c in redis["command"]]
    pairs = dict(zip(options[::2], options[1::2], strict=True))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--appendfsync"] in {"everysec", "always"}
    assert pairs["--maxmemory-policy"] == "noeviction"  # an evicting policy would drop sessions
    volumes = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"]}
    assert volumes[pairs["--dir"]] in data["volumes"], "the AOF must live on a named volume"
    # built from Debian's package on the normserve image's own base, under a full image name
    assert _is_fully_qualified(redis["image"]), redis["image"]
    dockerfile = (ROOT / redis["build"]["context"] / "Dockerfile").read_text()
    assert "redis-server" in dockerfile
    main_base = _default_base_image(ROOT / "Dockerfile")
    assert _default_base_image(ROOT / redis["build"]["context"] / "Dockerfile") == main_base
    assert (
        redis["build"]["args"]["BASE_IMAGE"]
        == data["services"]["normserve"]["build"]["args"]["BASE_IMAGE"]
    )


def _default_base_image(dockerfile: Path) -> str:
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ARG BASE_IMAGE="):
            return line.partition("=")[2].strip()
    raise AssertionError(f"{dockerfile}: no ARG BASE_IMAGE=...")


def test_compose_redis_image_keeps_acknowledged_writes_through_sigkill(engine: Engine) -> None:
    """The profile's Redis image, built and run: a write it acknowledged survives SIGKILL and a
    new container on the same volume (the AOF, not a clean-shutdown snapshot, holds it)."""
    tag = "localhost/normserve-redis:ci"
    engine.build(ROOT / "deploy" / "redis", tag)
    volume = f"normserve-redis-test-{uuid.uuid4().hex[:8]}"
    engine("volume", "create", volume)
    containers: list[str] = []

    def start() -> str:
        cid = engine("run", "-d", "-v", f"{volume}:/data", tag).stdout.strip()
        containers.append(cid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if engine("exec", cid, "redis-cli", "ping", check=False).stdout.strip() == "PONG":
                return cid
            time.sleep(0.2)
        raise AssertionError(engine("logs", cid, check=False).stdout)

    try:
        first = start()
        appendonly = engine("exec", first, "redis-cli", "config", "get", "appendonly").stdout
        assert appendonly.split() == ["appendonly", "yes"]
        assert engine("exec", first, "redis-cli", "set", "session", "v1").stdout.strip() == "OK"
        engine("kill", "--signal", "KILL", first)
        engine("wait", first, check=False)
        second = start()
        assert engine("exec", second, "redis-cli", "get", "session").stdout.strip() == "v1"
    finally:
        for cid in containers:
            engine("rm", "-f", cid, check=False)
        engine("volume", "rm", "-f", volume, check=False)
        engine.untag(tag)
