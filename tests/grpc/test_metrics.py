"""Metrics: what each call records, on an injected registry, served on /metrics."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import CollectorRegistry

from normserve.client import Client, InvalidArgumentError
from normserve.server import Server, Settings, start_server


@pytest.fixture
def observed() -> Iterator[tuple[Server, CollectorRegistry]]:
    registry = CollectorRegistry()
    srv = start_server(
        Settings(address="127.0.0.1:0", metrics_address="127.0.0.1:0", device="cpu"), registry
    )
    yield srv, registry
    srv.stop(0)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_calls_are_counted_timed_and_staged(observed: tuple[Server, CollectorRegistry]) -> None:
    srv, reg = observed
    with Client(srv.address) as client:
        sid = client.create_session(4).session_id
        for _ in range(3):
            client.normalize(sid, torch.randn(8, 4))
        client.normalize(sid, torch.randn(8, 4), mode="eval")
        with pytest.raises(InvalidArgumentError):
            client.normalize(sid, torch.randn(8, 5))
        list(client.normalize_stream(sid, [torch.randn(6, 4), torch.randn(6, 4)]))
    assert _value(reg, "normserve_requests_total", method="Normalize", code="OK") == 4
    assert _value(reg, "normserve_requests_total", method="Normalize", code="INVALID_ARGUMENT") == 1
    assert _value(reg, "normserve_requests_total", method="CreateSession", code="OK") == 1
    train = {"method": "Normalize", "kind": "batch_norm", "mode": "train", "code": "OK"}
    assert _value(reg, "normserve_rpc_duration_seconds_count", **train) == 3
    assert _value(reg, "normserve_rpc_duration_seconds_count", **{**train, "mode": "eval"}) == 1
    bad = {**train, "code": "INVALID_ARGUMENT"}
    assert _value(reg, "normserve_rpc_duration_seconds_count", **bad) == 1
    for stage in ("decode", "wait", "compute", "encode"):
        n = _value(reg, "normserve_stage_duration_seconds_count", method="Normalize", stage=stage)
        assert n == 4, stage
        n = _value(
            reg, "normserve_stage_duration_seconds_count", method="NormalizeStream", stage=stage
        )
        assert n == 2, stage
    assert (
        _value(reg, "normserve_normalized_elements_total", kind="batch_norm", mode="train")
        == 3 * 32 + 2 * 24
    )
    assert _value(reg, "normserve_applied_batches_total", kind="batch_norm") == 5
    assert _value(reg, "normserve_received_bytes_total", method="Normalize") > 5 * 128
    assert _value(reg, "normserve_sent_bytes_total", method="Normalize") > 4 * 128
    assert _value(reg, "normserve_sessions") == 1
    assert _value(reg, "normserve_inflight_calls", method="Normalize") == 0
    assert _value(reg, "normserve_open_streams") == 0
    assert _value(reg, "process_resident_memory_bytes") > 0
    build = [s for m in reg.collect() if m.name == "normserve_build" for s in m.samples]
    assert build and build[0].labels["version"] and build[0].value == 1


def test_stage_times_add_up_to_the_total(observed: tuple[Server, CollectorRegistry]) -> None:
    srv, reg = observed
    with Client(srv.address, chunk_bytes=8 << 20) as client:
        sid = client.create_session(64).session_id
        client.normalize(sid, torch.randn(64, 64, 16, 16))  # 4 MiB unary: stages dominate
    total = _value(
        reg,
        "normserve_rpc_duration_seconds_sum",
        method="Normalize",
        kind="batch_norm",
        mode="train",
        code="OK",
    )
    stages = sum(
        _value(reg, "normserve_stage_duration_seconds_sum", method="Normalize", stage=s)
        for s in ("decode", "wait", "compute", "encode")
    )
    assert 0.5 * total <= stages <= total, (stages, total)


def test_metrics_page_is_served_and_lints(observed: tuple[Server, CollectorRegistry]) -> None:
    srv, _ = observed
    with Client(srv.address) as client:
        sid = client.create_session(2).session_id
        client.normalize(sid, torch.randn(4, 2))
    page = urllib.request.urlopen(f"http://{srv.metrics_address}/metrics", timeout=10).read()
    text = page.decode()
    assert "# TYPE normserve_rpc_duration_seconds histogram" in text
    assert (
        'normserve_rpc_duration_seconds_bucket{code="OK",kind="batch_norm",le="5e-05",method="Normalize",mode="train"}'
        in text
    )
    assert "# TYPE normserve_requests_total counter" in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; .ci/run installs it)")
    lint = subprocess.run(
        [promtool, "check", "metrics"], input=page, capture_output=True, timeout=30
    )
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_metrics_can_be_turned_off() -> None:
    srv = start_server(Settings(address="127.0.0.1:0", metrics_address="off"))
    try:
        assert srv.metrics_server is None and srv.metrics_address == ""
    finally:
        srv.stop(0)


def test_a_cancelled_stream_counts_as_cancelled(observed: tuple[Server, CollectorRegistry]) -> None:
    import threading
    import time

    import grpc

    from normserve.v1 import normserve_pb2 as pb
    from normserve.v1 import normserve_pb2_grpc as pb_grpc

    from ._util import tensor

    srv, reg = observed
    with Client(srv.address) as client:
        sid = client.create_session(2).session_id
    hold = threading.Event()

    def requests():
        yield pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(4, 2)), end_of_batch=True
        )
        hold.wait(10)

    with grpc.insecure_channel(srv.address) as channel:
        call = pb_grpc.NormalizerStub(channel).NormalizeStream(requests())
        next(call)  # the first batch is answered; the client then gives up
        call.cancel()
        hold.set()
    deadline = time.monotonic() + 10
    labels = {"method": "NormalizeStream", "code": "CANCELLED"}
    while _value(reg, "normserve_requests_total", **labels) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _value(reg, "normserve_requests_total", **labels) == 1
    assert _value(reg, "normserve_requests_total", method="NormalizeStream", code="UNKNOWN") == 0
