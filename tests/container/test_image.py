"""The container image, built and run for real: health, a normalization, /metrics, SIGTERM -> exit 0.

Needs a container engine. On the project's machines: ``../shared/tools/container-env`` (rootful
podman plus a local stand-in for python:3.11-slim), which this test uses when it lies beside the
repository; otherwise a ``podman`` or ``docker`` that answers. Without one the test skips.
Run it with ``.ci/container`` or ``python -m pytest -m container tests/container``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.client import Client

pytestmark = pytest.mark.container

ROOT = Path(__file__).resolve().parents[2]
CONTAINER_ENV = ROOT.parent / "shared" / "tools" / "container-env"
IMAGE = "normserve:ci"
HOW_TO_RUN = (
    "no container engine: install podman (or docker), or on the project's machines run "
    "../shared/tools/container-env once, then: python -m pytest -m container tests/container "
    "(or .ci/container)"
)

BUILD_TIMEOUT_S = 1800  # a cold build installs torch; a warm one takes seconds
HEALTH_TIMEOUT_S = 90


def _answers(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "info"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _find_engine() -> list[str] | None:
    if CONTAINER_ENV.is_file():
        cmd = [str(CONTAINER_ENV), "podman"]
        if _answers(cmd):
            return cmd
    for name in ("podman", "docker"):
        exe = shutil.which(name)
        if exe and _answers([exe]):
            return [exe]
    return None


class Engine:
    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.is_podman = "podman" in Path(cmd[-1]).name

    def __call__(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`{' '.join(args[:2])} ...` exited {proc.returncode}:\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc


@pytest.fixture(scope="module")
def engine() -> Engine:
    cmd = _find_engine()
    if cmd is None:
        if os.environ.get("NORMSERVE_REQUIRE_CONTAINER"):  # set by .ci/container: no silent skip
            pytest.fail(HOW_TO_RUN)
        pytest.skip(HOW_TO_RUN)
    return Engine(cmd)


@pytest.fixture(scope="module")
def image(engine: Engine) -> tuple[str, float, int]:
    # podman's default OCI format would drop HEALTHCHECK; docker always keeps it
    fmt = ["--format", "docker"] if engine.is_podman else []
    t0 = time.monotonic()
    engine("build", *fmt, "-t", IMAGE, str(ROOT), timeout=BUILD_TIMEOUT_S)
    built_s = time.monotonic() - t0
    size = int(engine("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    return IMAGE, built_s, size


def _wait_serving(engine: Engine, name: str, target: str) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    last: object = None
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as e:
                last = e.code()
            running = engine("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            if running != "true":
                logs = engine("logs", name, check=False)
                pytest.fail(f"container exited before serving:\n{logs.stdout}\n{logs.stderr}")
            time.sleep(1)
    logs = engine("logs", name, check=False)
    pytest.fail(
        f"not SERVING after {HEALTH_TIMEOUT_S}s (last: {last}):\n{logs.stdout}\n{logs.stderr}"
    )


def _fetch_metrics(url: str, tries: int = 10) -> str:
    err: Exception | None = None
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())
        except (urllib.error.URLError, OSError) as e:
            err = e
            time.sleep(1)
    return f"<no /metrics at {url}: {err}>"


def _published_port(engine: Engine, name: str, container_port: int) -> int:
    """The host port the engine picked for ``container_port`` (published as ``127.0.0.1::PORT``,
    so no port is chosen here and then raced for)."""
    out = engine("port", name, f"{container_port}/tcp").stdout
    for line in out.splitlines():  # "127.0.0.1:41234" (docker may list one line per address)
        host, _, port = line.strip().rpartition(":")
        if host == "127.0.0.1" and port.isdigit():
            return int(port)
    raise AssertionError(f"no 127.0.0.1 port published for {container_port}: {out!r}")


@pytest.fixture
def container(engine: Engine, image: tuple[str, float, int]) -> Iterator[tuple[str, int, int]]:
    name = f"normserve-test-{uuid.uuid4().hex[:8]}"
    engine(
        "run", "-d", "--name", name,
        "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9464",
        "-e", "NORMSERVE_DEVICE=cpu",
        image[0],
        timeout=120,
    )  # fmt: skip
    try:
        yield name, _published_port(engine, name, 50051), _published_port(engine, name, 9464)
    finally:
        engine(
            "rm", "-f", *(["-t", "0"] if engine.is_podman else []), name, timeout=60, check=False
        )


@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_image_serves_normalizes_exports_metrics_and_stops_cleanly(
    engine: Engine,
    image: tuple[str, float, int],
    container: tuple[str, int, int],
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    tag, built_s, size = image
    record_property("image_size_bytes", size)
    with capsys.disabled():
        print(
            f"\n[container] built {tag} in {built_s:.0f}s; image size {size / 1e6:.0f} MB ({size} bytes)"
        )
    name, grpc_port, metrics_port = container
    target = f"127.0.0.1:{grpc_port}"
    t0 = time.monotonic()
    _wait_serving(engine, name, target)
    ready_s = time.monotonic() - t0

    user = engine("inspect", "--format", "{{.Config.User}}", name).stdout.strip()
    assert user and user.split(":")[0] not in ("0", "root"), f"runs as {user!r}"
    if engine.is_podman:  # the image's own HEALTHCHECK command (docker runs it on its own)
        hc = engine("healthcheck", "run", name, timeout=30, check=False)
        assert hc.returncode == 0, f"HEALTHCHECK failed: {hc.stdout}{hc.stderr}"

    torch.manual_seed(0)
    x = torch.randn(8, 4)
    with Client(target, timeout=30) as client:
        session = client.create_session(4)
        y = client.normalize(session.session_id, x).output
    expected = torch.nn.BatchNorm1d(4)(x).detach()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)

    metrics = _fetch_metrics(f"http://127.0.0.1:{metrics_port}/metrics")

    t1 = time.monotonic()
    engine("stop", "-t", "20", name, timeout=90)  # SIGTERM, SIGKILL only after 20 s
    stop_s = time.monotonic() - t1
    code = engine("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    logs = engine("logs", name, check=False)
    with capsys.disabled():
        print(
            f"\n[container] SERVING after {ready_s:.1f}s; stopped in {stop_s:.1f}s, exit code {code}"
        )
    assert code == "0", f"exit code {code} after SIGTERM:\n{logs.stdout}\n{logs.stderr}"
    assert stop_s < 20, f"took {stop_s:.1f}s to stop: SIGTERM not handled?"

    assert "normserve_requests_total" in metrics, (
        f"no normserve_requests_total in /metrics:\n{metrics[:2000]}"
    )
