"""The container image, built and run for real: health, a normalization, /metrics, SIGTERM -> exit 0.

Needs a container engine: podman or docker (see tests/container/_engine.py); without one the tests
skip. Run them with ``.ci/container`` or ``python -m pytest -m container tests/container``.
"""

from __future__ import annotations

import secrets
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.client import Client, NormserveError

from ._engine import BUILD_TIMEOUT_S, Built, Engine

pytestmark = pytest.mark.container

HEALTH_TIMEOUT_S = 90
TOKEN = secrets.token_hex(32)
# torch imported without numpy beside it says so at import; neither the build nor the server may
NUMPY_WARNING = "Failed to initialize NumPy"


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
def container(engine: Engine, image: Built) -> Iterator[tuple[str, int, int]]:
    name = f"normserve-test-{uuid.uuid4().hex[:8]}"
    # The image serves 0.0.0.0 inside the container, so it runs authenticated, as a user runs it:
    # a token from the environment (NORMSERVE_AUTH_TOKENS; a secret file works the same way).
    engine(
        "run", "-d", "--name", name,
        "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9464",
        "-e", "NORMSERVE_DEVICE=cpu",
        "-e", f"NORMSERVE_AUTH_TOKENS=default {TOKEN}",
        image.tag,
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
    image: Built,
    container: tuple[str, int, int],
    capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, object], None],
) -> None:
    record_property("image_size_bytes", image.size)
    with capsys.disabled():
        print(
            f"\n[container] built {image.tag} in {image.seconds:.0f}s; "
            f"image size {image.size / 1e6:.0f} MB ({image.size} bytes)"
        )
    assert NUMPY_WARNING not in image.output, "the build imported torch without numpy"
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

    with Client(target, timeout=30) as anonymous, pytest.raises(NormserveError) as refused:
        anonymous.list_sessions()
    assert refused.value.code is grpc.StatusCode.UNAUTHENTICATED, refused.value
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    with Client(target, timeout=30, token=TOKEN) as client:
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

    assert NUMPY_WARNING not in logs.stdout + logs.stderr, (
        f"server logs:\n{logs.stdout}{logs.stderr}"
    )
    assert "normserve_requests_total" in metrics, (
        f"no normserve_requests_total in /metrics:\n{metrics[:2000]}"
    )


def test_image_will_not_serve_the_network_without_auth(engine: Engine, image: Built) -> None:
    """Protected mode in the image: 0.0.0.0 and no tokens or mutual TLS -> it refuses to start."""
    done = engine("run", "--rm", "-e", "NORMSERVE_DEVICE=cpu", image.tag, timeout=120, check=False)
    assert done.returncode == 2, done
    out = done.stdout + done.stderr
    assert "normserve cannot start" in out and "0.0.0.0:50051" in out, out
    assert "Traceback" not in out
