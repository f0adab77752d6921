"""``normserve bench`` and the benchmark suite: smoke tests against real servers, scheduler logic
with fake calls, JSON round trip, compare, the loopback guard, the plot."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from normserve.client import Client, NormserveError
from normserve.client._cli import main
from normserve.client.bench import (
    Call,
    CallFactory,
    EarlyFailure,
    Result,
    check_target,
    compare_table,
    encode_batch,
    format_summary,
    is_loopback,
    load_result,
    new_histogram,
    run_load,
)
from normserve.server import Server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_from_proto

from ..grpc._util import metric, settled

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str) -> int:
    return main(["bench", "--quiet", *args])


def sleeping(seconds: float, log: list[float] | None = None) -> CallFactory:
    """A fake call that takes ``seconds`` (and notes when it was sent)."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[Call]:
        async def call() -> None:
            if log is not None:
                log.append(time.perf_counter())
            await asyncio.sleep(seconds)

        yield call

    return factory


# ---- against a real normserve server


def test_closed_loop_json_and_plot(server: Server, client: Client, tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = bench(
        "--target", server.address, "--duration", "1", "--warmup", "0.2", "--concurrency", "2",
        "--json", str(out), "--plot", str(png),
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["summary"]["count"] > 0
    assert data["summary"]["errors"] == {}
    assert data["config"]["concurrency"] == 2 and data["config"]["shape"] == [64, 256]
    assert {"cpu_count", "python", "torch", "grpcio"} <= set(data["machine"])
    assert sum(p["count"] for p in data["series"]) == data["summary"]["count"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.list_sessions() == []  # the fresh session was deleted


def test_stream_in_chunks_on_existing_session(server: Server, client: Client) -> None:
    session = client.create_session(4)
    rc = bench(
        "--target", server.address, "--rpc", "stream", "--shape", "16,4,300",
        "--chunk-bytes", "4096", "--session", session.session_id, "--mode", "train",
        "--duration", "0.5", "--warmup", "0.1",
    )  # fmt: skip
    assert rc == 0
    assert client.get_session(session.session_id).num_batches_tracked > 0  # kept, and trained


def test_requests_bound_stops_early(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    started = time.monotonic()
    rc = bench(
        "--target", server.address, "--requests", "25", "--duration", "60", "--warmup", "0",
        "--json", str(out),
    )  # fmt: skip
    assert rc == 0
    assert time.monotonic() - started < 20
    assert load_result(str(out)).count == 25


def test_errors_counted_by_status_code(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench(
        "--target", server.address, "--session", "nope", "--requests", "5", "--warmup", "0",
        "--json", "-",
    )  # fmt: skip
    assert rc == 1  # failures make the exit status non-zero
    data = json.loads(capsys.readouterr().out)  # stdout is the JSON alone
    assert data["summary"]["errors"] == {"NOT_FOUND": 5}
    assert data["summary"]["count"] == 0


def test_a_wrong_session_stops_the_run_with_the_servers_message(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    rc = bench("--target", server.address, "--session", "nope", "--duration", "30")
    assert rc == 1 and time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "bench stopped: its first 10 requests all failed with NOT_FOUND" in err
    assert "session 'nope' not found" in err
    rc = bench("--target", server.address, "--shape", "1,64", "--duration", "30", "--json", "-")
    doc = json.loads(capsys.readouterr().out)  # one JSON document, the error
    assert rc == 1 and doc["error"]["code"] == "INVALID_ARGUMENT"
    assert "more than 1 value per channel" in doc["error"]["message"]


def test_a_stream_run_ends_its_streams_cleanly(server: Server) -> None:
    rc = bench(
        "--target", server.address, "--rpc", "stream", "--shape", "8,4", "--concurrency", "3",
        "--duration", "0.3", "--warmup", "0",
    )  # fmt: skip
    assert rc == 0
    registry = server.metrics.registry
    # closed by the client (half-close, then the server's OK), never cancelled
    ok = settled(registry, "normserve_requests_total", 3, method="NormalizeStream", code="OK")
    assert ok == 3
    cancelled = metric(
        registry, "normserve_requests_total", method="NormalizeStream", code="CANCELLED"
    )
    assert cancelled == 0


class _Recording(pb_grpc.NormalizerServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def _note(self, context: Any) -> None:
        self.metadata.append(dict(context.invocation_metadata()))

    def CreateSession(self, request: Any, context: Any) -> Any:
        self._note(context)
        return pb.CreateSessionResponse(session=pb.Session(session_id="s"))

    def DeleteSession(self, request: Any, context: Any) -> Any:
        self._note(context)
        return pb.DeleteSessionResponse()

    def Normalize(self, request: Any, context: Any) -> Any:
        self._note(context)
        return pb.NormalizeResponse(output=request.input)


@pytest.fixture
def recording() -> Iterator[tuple[_Recording, str]]:
    servicer = _Recording()
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_NormalizerServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(0)


def test_metadata_sent_with_every_call(recording: tuple[_Recording, str]) -> None:
    servicer, target = recording
    rc = bench(
        "--target", target, "--metadata", "x-tenant=blue", "--metadata", "Authorization=Bearer t",
        "--requests", "3", "--warmup", "0",
    )  # fmt: skip
    assert rc == 0
    assert len(servicer.metadata) == 5  # create, 3 x normalize, delete
    for md in servicer.metadata:
        assert md["x-tenant"] == "blue" and md["authorization"] == "Bearer t"


# ---- the scheduler, in isolation


def test_open_loop_counts_from_intended_send_time() -> None:
    # Due every 25 ms, served in 50 ms by one caller: the queue grows, and so must the latencies
    # (a closed loop, or an open loop timing from the actual send, would report ~50 ms flat).
    r = asyncio.run(run_load(sleeping(0.05), rate=40, concurrency=1, duration=0.5, warmup=0))
    assert not r.errors
    # the run ends on time: what fell due but was never sent is counted, not sent late
    assert r.count + r.missed == 20 and 8 <= r.count <= 11
    assert r.target_rate == 40 and not r.rate_reached
    lat = r.latency_us()
    assert 45_000 <= lat["min"] <= 80_000
    assert lat["max"] >= 200_000  # the last one sent was due ~0.25 s before it went out
    assert "WARNING the target rate was not reached" in format_summary(r)
    closed = asyncio.run(run_load(sleeping(0.05), concurrency=1, duration=0.3, warmup=0))
    assert closed.latency_us()["max"] < 150_000


def test_open_loop_drops_a_warm_up_that_fell_behind() -> None:
    # 100/s due, 20/s served: by the end of the warm-up, 40 warm-up requests are overdue. They are
    # dropped, so the measured window starts on schedule instead of inheriting their queue.
    r = asyncio.run(run_load(sleeping(0.05), rate=100, concurrency=1, duration=0.3, warmup=0.5))
    assert r.latency_us()["min"] < 100_000
    assert r.count + r.missed == 30


def test_open_loop_that_keeps_up_says_so() -> None:
    r = asyncio.run(run_load(sleeping(0.001), rate=50, concurrency=4, duration=0.4, warmup=0))
    assert r.rate_reached and r.missed == 0 and r.sent == 20
    assert "WARNING" not in format_summary(r)
    assert Result.from_dict(r.to_dict()).sent == 20


def failing(code: grpc.StatusCode, message: str, every: int = 1) -> CallFactory:
    """A fake call that fails with ``code`` on every ``every``-th call (succeeds otherwise)."""
    count = 0

    @asynccontextmanager
    async def factory() -> AsyncIterator[Call]:
        async def call() -> None:
            nonlocal count
            count += 1
            await asyncio.sleep(0.001)
            if count % every == 0:
                raise NormserveError(code, message)

        yield call

    return factory


def test_a_run_whose_first_requests_all_fail_alike_stops() -> None:
    started = time.monotonic()
    with pytest.raises(EarlyFailure, match="first 10 requests all failed with NOT_FOUND: gone"):
        asyncio.run(run_load(failing(grpc.StatusCode.NOT_FOUND, "gone"), duration=30))
    assert time.monotonic() - started < 5
    # failures mixed with successes are measured, not stopped
    r = asyncio.run(
        run_load(failing(grpc.StatusCode.NOT_FOUND, "gone", every=2), duration=0.2, warmup=0)
    )
    assert r.count > 0 and r.errors["NOT_FOUND"] > 0


def test_open_loop_paces_at_the_rate() -> None:
    sent: list[float] = []
    r = asyncio.run(
        run_load(sleeping(0.001, sent), rate=50, concurrency=4, duration=0.4, warmup=0.1)
    )
    assert r.count == 20  # due at 0.10, 0.12, ... 0.48 s: measured; the first 5 were warm-up
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert 0.015 < sorted(gaps)[len(gaps) // 2] < 0.025
    assert r.latency_us()["p50"] < 15_000  # not the gaps: latency is per request


def test_hard_stop_cancels_hung_calls() -> None:
    started = time.monotonic()
    r = asyncio.run(run_load(sleeping(3600), concurrency=3, duration=0.2, warmup=0, drain=0.3))
    assert time.monotonic() - started < 3
    assert r.count == 0 and r.errors == {"UNFINISHED": 3}


def test_requests_bound_in_isolation() -> None:
    r = asyncio.run(run_load(sleeping(0.001), concurrency=3, requests=7, duration=30, warmup=0))
    assert r.count == 7


def test_encode_batch_chunks_along_dim0() -> None:
    x = torch.randn(10, 4, 25)  # 400 bytes a row
    (unary,) = encode_batch("s1", x, "eval", rpc="unary")
    req = pb.NormalizeRequest.FromString(unary)
    assert req.session_id == "s1" and req.mode == pb.MODE_EVAL
    assert torch.equal(tensor_from_proto(req.input), x)
    chunks = [
        pb.NormalizeStreamRequest.FromString(b)
        for b in encode_batch("s1", x, "train", rpc="stream", chunk_bytes=1000)
    ]
    assert [list(m.chunk.shape) for m in chunks] == [[2, 4, 25]] * 5
    assert [m.session_id for m in chunks] == ["s1", "", "", "", ""]
    assert chunks[0].mode == pb.MODE_TRAIN and [m.end_of_batch for m in chunks][-2:] == [
        False,
        True,
    ]
    assert torch.equal(torch.cat([tensor_from_proto(m.chunk) for m in chunks]), x)


# ---- results, compare, guard


def _result(values_us: list[int], elapsed: float, **config: Any) -> Result:
    h = new_histogram()
    for v in values_us:
        h.record_value(v)
    return Result(h, elapsed, {"UNAVAILABLE": 1}, 1000, [], {"rpc": "unary", **config})


def test_json_round_trip_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _result([100, 200, 300, 400], 1.0, concurrency=1)
    b = _result([200, 400, 600, 800, 900, 1000, 1100, 1200], 1.0, concurrency=4)
    a.write_json(str(tmp_path / "a.json"))
    b.write_json(str(tmp_path / "b.json"))
    again = load_result(str(tmp_path / "a.json"))
    assert again.summary() == a.summary() and again.config == a.config
    assert again.histogram.get_value_at_percentile(50) == a.histogram.get_value_at_percentile(50)
    table = compare_table(a, b)
    assert "2.00x" in table  # count and throughput doubled
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "b/a" in out and "p99.9" in out and "req/s" in out
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "bad.json")]) == 1


def test_remote_targets_refused_without_allow_remote(capsys: pytest.CaptureFixture[str]) -> None:
    local = ["127.0.0.1:1", "127.3.2.1:1", "localhost:50051", "[::1]:1", "ipv4:127.0.0.1:5",
             "dns:///localhost:50051", "unix:/tmp/normserve.sock"]  # fmt: skip
    remote = ["10.0.0.1:50051", "example.com:443", "[2001:db8::1]:443", "0.0.0.0:50051"]
    assert all(is_loopback(t) for t in local)
    assert not any(is_loopback(t) for t in remote)
    check_target("10.0.0.1:50051", allow_remote=True)
    assert bench("--target", "10.0.0.1:50051") == 1
    err = capsys.readouterr().err
    assert "not a loopback address" in err and "--allow-remote" in err


# ---- the suite


def test_suite_report_refreshes_only_its_part_of_the_page(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run import REPORT_BEGIN, REPORT_END, place_report
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    page = tmp_path / "benchmarks.md"
    report = "# Benchmarks\n\nnew figures\n\n## Workload S\n"
    assert place_report(page, report) == report  # no page yet: the report alone
    page.write_text(f"# Summary\nkept\n{REPORT_BEGIN}\nold figures\n{REPORT_END}\nafter\n")
    placed = place_report(page, report)
    assert placed.startswith("# Summary\nkept\n") and placed.endswith(f"{REPORT_END}\nafter\n")
    assert "old figures" not in placed and "new figures" in placed
    assert "### Latency and throughput report" in placed and "#### Workload S" in placed


def test_suite_quick_writes_the_report(tmp_path: Path) -> None:
    out, js = tmp_path / "bench.md", tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out),
         "--json", str(js)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Machine and versions", "## Targets", "## Workload S", "## Workload L"):
        assert heading in text
    assert "p50 / echo p50" in text and "--quick" in text
    assert "targets" in proc.stdout and "p50/echo" in proc.stdout
    data = json.loads(js.read_text())
    results = data["results"]
    assert results["S/echo/unary/-/c1"]["summary"]["count"] > 0
    assert results["L/normserve/stream/train/c1"]["summary"]["count"] > 0
    # Each verdict is the one its measurements imply, in the JSON and on stdout alike.
    expected = _expected_verdicts(data)
    assert len(expected) == 6, expected
    stored = {name: verdict for name, _, verdict in data["meta"]["targets"]}
    printed = proc.stdout.split("\ntargets\n", 1)[1].splitlines()
    for name, verdict in expected.items():
        if verdict is None:
            continue  # too close to its threshold to recompute from rounded JSON
        assert stored[name] == verdict, name
        (line,) = [row for row in printed if row.startswith(name + "  ")]
        assert line.split()[-1] == verdict, line


def _expected_verdicts(data: dict[str, Any]) -> dict[str, str | None]:
    """Recomputes from the suite's JSON results the verdict of the targets that need no compute
    figures: PASS, MISS or n/a (None where a ratio is within 1e-4 of its threshold)."""
    results = {key: Result.from_dict(r) for key, r in data["results"].items()}

    def ratio(
        key: str, limit: str, threshold: float, ok: Callable[[float, float], bool], p50: bool
    ) -> str | None:
        r, lim = results[key], results[limit]
        if not (r.count and lim.count):
            return "n/a"
        if p50:
            value = r.latency_us()["p50"] / lim.latency_us()["p50"]
        else:
            value = r.throughput_rps / lim.throughput_rps
        if abs(value - threshold) < 1e-4:
            return None
        return "PASS" if ok(value, threshold) else "MISS"

    def at_most(v: float, t: float) -> bool:
        return v <= t

    def at_least(v: float, t: float) -> bool:
        return v >= t

    out: dict[str, str | None] = {}
    for wl in ("S", "M"):
        out[f"{wl} unary TRAIN c1 p50 <= 1.2x echo p50"] = ratio(
            f"{wl}/normserve/unary/train/c1", f"{wl}/echo/unary/-/c1", 1.2, at_most, True
        )
    out["S unary TRAIN c4 throughput >= 0.8x echo"] = ratio(
        "S/normserve/unary/train/c4", "S/echo/unary/-/c4", 0.8, at_least, False
    )
    out["L stream TRAIN c1 throughput >= 0.7x echo stream"] = ratio(
        "L/normserve/stream/train/c1", "L/echo/stream/-/c1", 0.7, at_least, False
    )
    out["S unary TRAIN c64: no errors"] = (
        "MISS" if results["S/normserve/unary/train/c64"].errors else "PASS"
    )
    hwm = data["server_memory_kib"].get("VmHWM")
    out["server peak RSS < 1 GiB"] = "n/a" if hwm is None else "PASS" if hwm < 1 << 20 else "MISS"
    return out


def test_errors_show_what_the_server_said(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = bench("--target", server.address, "--session", "nope", "--requests", "3", "--warmup", "0")
    out = capsys.readouterr().out
    assert rc == 1  # a run with errors fails
    assert "errors  NOT_FOUND 3 (first: session 'nope' not found)" in out
    assert "latency none: no request succeeded" in out
