"""Metrics: what each call records, on an injected registry, served on /metrics."""

from __future__ import annotations

import shutil
import subprocess
import threading
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from normserve.client import Client, InvalidArgumentError
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

from ._util import metric, settled, tensor, until


@pytest.fixture
def observed() -> Iterator[tuple[Server, CollectorRegistry]]:
    registry = CollectorRegistry()
    srv = start_server(
        Settings(address="127.0.0.1:0", metrics_address="127.0.0.1:0", device="cpu"), registry
    )
    yield srv, registry
    srv.stop(0)


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
    requests = "normserve_requests_total"
    assert settled(reg, requests, 4, method="Normalize", code="OK") == 4
    assert settled(reg, requests, 1, method="Normalize", code="INVALID_ARGUMENT") == 1
    assert settled(reg, requests, 1, method="NormalizeStream", code="OK") == 1
    assert settled(reg, requests, 1, method="CreateSession", code="OK") == 1
    train = {"method": "Normalize", "kind": "batch_norm", "mode": "train", "code": "OK"}
    duration = "normserve_rpc_duration_seconds_count"
    assert settled(reg, duration, 3, **train) == 3
    assert settled(reg, duration, 1, **{**train, "mode": "eval"}) == 1
    assert settled(reg, duration, 1, **{**train, "code": "INVALID_ARGUMENT"}) == 1
    stages = "normserve_stage_duration_seconds_count"
    for stage in ("decode", "wait", "compute", "encode"):
        assert settled(reg, stages, 4, method="Normalize", stage=stage) == 4, stage
        assert settled(reg, stages, 2, method="NormalizeStream", stage=stage) == 2, stage
    elements = 3 * 32 + 2 * 24
    assert (
        settled(
            reg, "normserve_normalized_elements_total", elements, kind="batch_norm", mode="train"
        )
        == elements
    )
    assert settled(reg, "normserve_applied_batches_total", 5, kind="batch_norm") == 5
    assert until(
        lambda: metric(reg, "normserve_received_bytes_total", method="Normalize") > 5 * 128
    )
    assert until(lambda: metric(reg, "normserve_sent_bytes_total", method="Normalize") > 4 * 128)
    assert settled(reg, "normserve_sessions", 1) == 1
    assert settled(reg, "normserve_inflight_calls", 0, method="Normalize") == 0
    assert settled(reg, "normserve_open_streams", 0) == 0
    assert metric(reg, "process_resident_memory_bytes") > 0
    build = [s for m in reg.collect() if m.name == "normserve_build" for s in m.samples]
    assert build and build[0].labels["version"] and build[0].value == 1


def test_stage_times_add_up_to_the_total(observed: tuple[Server, CollectorRegistry]) -> None:
    srv, reg = observed
    labels = {"method": "Normalize", "kind": "batch_norm", "mode": "train", "code": "OK"}
    stage_names = ("decode", "wait", "compute", "encode")

    def sums() -> tuple[float, float]:
        total = metric(reg, "normserve_rpc_duration_seconds_sum", **labels)
        stages = sum(
            metric(reg, "normserve_stage_duration_seconds_sum", method="Normalize", stage=s)
            for s in stage_names
        )
        return total, stages

    # The stages cover most of a call; how much of the rest is scheduling depends on how busy the
    # machine is, so the share is judged on the best of a few calls, each on its own.
    shares = []
    with Client(srv.address, chunk_bytes=8 << 20) as client:
        sid = client.create_session(64).session_id
        for n in range(1, 6):
            before = sums()
            client.normalize(sid, torch.randn(64, 64, 16, 16))  # 4 MiB unary: stages dominate
            assert settled(reg, "normserve_rpc_duration_seconds_count", n, **labels) == n
            for s in stage_names:
                count = "normserve_stage_duration_seconds_count"
                assert settled(reg, count, n, method="Normalize", stage=s) == n, s
            total, stages = (a - b for a, b in zip(sums(), before, strict=True))
            assert 0 < stages <= total, (stages, total)
            shares.append(stages / total)
    assert max(shares) >= 0.5, shares


def test_metrics_page_is_served_and_lints(observed: tuple[Server, CollectorRegistry]) -> None:
    srv, reg = observed
    with Client(srv.address) as client:
        sid = client.create_session(2).session_id
        client.normalize(sid, torch.randn(4, 2))
    train = {"method": "Normalize", "kind": "batch_norm", "mode": "train", "code": "OK"}
    assert settled(reg, "normserve_rpc_duration_seconds_count", 1, **train) == 1
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
    """A client that gives up in the middle of a batch: CANCELLED, never INVALID_ARGUMENT for the
    batch it left unfinished (its requests may end before its cancellation arrives). A client
    that cancels after its last answer may be counted OK: grpc.aio can finish such a handler
    before it learns of the cancellation, and nothing of the stream was lost."""
    srv, reg = observed
    with Client(srv.address) as client:
        sid = client.create_session(2).session_id
        version = client.get_session(sid).version
    for _ in range(5):
        hold = threading.Event()

        def requests(hold: threading.Event = hold) -> Iterator[pb.NormalizeStreamRequest]:
            yield pb.NormalizeStreamRequest(
                session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(4, 2))
            )
            hold.wait(10)

        received = metric(reg, "normserve_received_bytes_total", method="NormalizeStream")
        with grpc.insecure_channel(srv.address) as channel:
            call = pb_grpc.NormalizerStub(channel).NormalizeStream(requests())
            until(
                lambda r=received: (
                    metric(reg, "normserve_received_bytes_total", method="NormalizeStream") > r
                )
            )
            call.cancel()  # half a batch in: the client gives up
            hold.set()
    cancelled = {"method": "NormalizeStream", "code": "CANCELLED"}
    assert settled(reg, "normserve_requests_total", 5, **cancelled) == 5
    assert settled(reg, "normserve_open_streams", 0) == 0
    for code in ("UNKNOWN", "INVALID_ARGUMENT", "OK"):
        assert metric(reg, "normserve_requests_total", method="NormalizeStream", code=code) == 0
    with Client(srv.address) as client:
        assert client.get_session(sid).version == version  # nothing of the halves was applied
