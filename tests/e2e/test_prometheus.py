"""A real Prometheus scrapes normserve: its p99 agrees with the client's, and every dashboard
panel's query returns data. Skips where the prometheus binary is absent (.ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from normserve.client import Client, InvalidArgumentError
from normserve.server import Server, Settings, start_server

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards" / "normserve.json"
)
PROMETHEUS = shutil.which("prometheus")

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="needs the prometheus binary (Debian package 'prometheus'; .ci/run installs it)",
)


# Prometheus logs the address it bound (``msg="Listening on" address=127.0.0.1:PORT``); asked
# for port 0 it picks a free one, so no port is chosen here and then raced for.
LISTENING = re.compile(r'msg="Listening on" address=(\S+)')


def _bound_address(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = LISTENING.search(log.read_text(errors="replace"))
        if match:
            return match.group(1)
        assert proc.poll() is None, f"prometheus exited {proc.returncode}:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"prometheus never said where it listens:\n{log.read_text()}")


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> dict:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as resp:
            body = json.load(resp)
        assert body["status"] == "success", (expr, body)
        return body["data"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)["result"]
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.scalar(expr)
            if value is not None and value == value:  # not NaN
                return value
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never answered {expr!r} with data")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Prometheus]]:
    srv = start_server(Settings(address="127.0.0.1:0", metrics_address="127.0.0.1:0", device="cpu"))
    tmp = tmp_path_factory.mktemp("prometheus")
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: normserve\n"
        f"    static_configs:\n      - targets: ['{srv.metrics_address}']\n"
    )
    log = tmp / "prometheus.log"
    assert PROMETHEUS is not None
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp / 'data'}",
                "--web.listen-address=127.0.0.1:0",
                "--log.level=info",  # the "Listening on" line is at info
            ],
            stdout=subprocess.DEVNULL,
            stderr=sink,
        )
    try:
        prom = Prometheus(f"http://{_bound_address(proc, log)}")
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, (
                    "prometheus did not start"
                )
                time.sleep(0.3)
        prom.wait_for('up{job="normserve"} == 1')  # a first scrape before any traffic
        yield srv, prom
    finally:
        proc.terminate()
        proc.wait(20)
        srv.stop(0)


@pytest.fixture(scope="module")
def traffic(stack: tuple[Server, Prometheus]) -> list[float]:
    """Three seconds of mixed traffic; returns the client's Normalize latencies (seconds)."""
    srv, prom = stack
    latencies: list[float] = []
    with Client(srv.address) as client:
        sid = client.create_session(256).session_id
        x = torch.randn(64, 256)
        end = time.monotonic() + 3
        while time.monotonic() < end:
            t0 = time.perf_counter()
            client.normalize(sid, x)
            latencies.append(time.perf_counter() - t0)
        client.normalize(sid, x, mode="eval")
        list(client.normalize_stream(sid, [x, x]))
        with pytest.raises(InvalidArgumentError):
            client.normalize(sid, torch.randn(4, 3))
    count = len(latencies)
    prom.wait_for(f'sum(normserve_requests_total{{method="Normalize",code="OK"}}) >= {count + 1}')
    # one more scrape after the final counts, so rate() windows end on them
    scrapes = prom.wait_for('count_over_time(up{job="normserve"}[10m])')
    prom.wait_for(f'count_over_time(up{{job="normserve"}}[10m]) >= {scrapes + 1}')
    return latencies


def test_prometheus_p99_matches_the_client(
    stack: tuple[Server, Prometheus], traffic: list[float]
) -> None:
    _, prom = stack
    server_p99 = prom.wait_for(
        "histogram_quantile(0.99, sum by (le) (rate("
        'normserve_rpc_duration_seconds_bucket{method="Normalize",mode="train",code="OK"}[1m])))'
    )
    client = sorted(traffic)
    client_p50 = client[len(client) // 2]
    client_p99 = client[int(len(client) * 0.99)]
    print(
        f"\n{len(client)} calls: Prometheus p99 {server_p99 * 1e6:.0f} us (server side), "
        f"client p99 {client_p99 * 1e6:.0f} us, client p50 {client_p50 * 1e6:.0f} us"
    )
    # The server's time is part of the client's: its p99 cannot exceed the client's, beyond the
    # resolution of the bucket the client's p99 falls in (histogram_quantile interpolates).
    buckets = _bucket_bounds(prom)
    assert buckets[0] == 50e-6 and buckets[-1] == 10.0  # the README's "50 us to 10 s"
    bound = next(b for b in buckets if b >= client_p99)
    assert 0 < server_p99 <= bound
    assert server_p99 >= buckets[0]


def _bucket_bounds(prom: Prometheus) -> list[float]:
    """The latency histogram's finite bucket bounds, as Prometheus scraped them."""
    series = prom.query(
        'normserve_rpc_duration_seconds_bucket{method="Normalize",mode="train",code="OK"}'
    )["result"]
    return sorted(float(s["metric"]["le"]) for s in series if s["metric"]["le"] != "+Inf")


def _dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append((panel["title"], target["expr"]))
    return out


def test_every_dashboard_query_returns_data(
    stack: tuple[Server, Prometheus], traffic: list[float]
) -> None:
    _, prom = stack
    exprs = _dashboard_exprs()
    assert len(exprs) >= 6
    empty = []
    for title, expr in exprs:
        concrete = re.sub(r"\$__rate_interval|\$__interval|\$__range", "1m", expr)
        result = prom.query(concrete)["result"]
        if not result and "CUDA only" not in title:
            empty.append((title, concrete))
    assert not empty, f"panels without data: {empty}"
