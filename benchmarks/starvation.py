"""Starvation benchmark: unary latency and health with 1,000 idle + 64 parked streams open.

Starts a normserve server as a subprocess (this checkout's, or another build's with ``--python`` /
``--pythonpath``), then measures from this process:

- S [64,256] and M [256,1024] unary TRAIN: p50 at concurrency 1 and throughput at concurrency 4;
  L [32,64,56,56] NormalizeStream TRAIN at concurrency 1 (``normserve.client.bench.run_load``);
- unary Normalize [64,256] float32 TRAIN p50/p99 over ``--calls`` calls, unloaded, then with
  ``--idle`` streams that send nothing and ``--parked`` streams parked in the middle of a TRAIN
  batch, plus the health status and how long a health Check takes under that load.

Every wait is bounded (per-call timeouts, a time budget for the loaded phase), so a server that
starves prints what happened (errors by status code) instead of hanging.

    python benchmarks/starvation.py --json /tmp/aio.json
    python benchmarks/starvation.py --pythonpath /tmp/basepkg --json /tmp/sync.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.client import AsyncClient
from normserve.client.bench import normserve_calls, run_load
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_to_proto

LISTENING = re.compile(r"normserve listening on (\S+):(\d+)")


# ---- the server under test


def _server_command(python: str, env: dict[str, str], extra: list[str]) -> list[str]:
    """``python -m normserve.server`` where the build has it; older builds serve from the client
    CLI (``python -m normserve serve``)."""
    # The entry point must sit next to the normserve.server this PYTHONPATH imports: an editable
    # install's finder would otherwise pair this checkout's __main__ with the other build.
    probe = (
        "import os, normserve.server as s; "
        "print(os.path.exists(os.path.join(os.path.dirname(s.__file__), '__main__.py')))"
    )
    has_main = subprocess.run(
        [python, "-c", probe], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.strip()
    module = ["normserve.server"] if has_main == "True" else ["normserve", "serve"]
    return [python, "-m", *module, "--address", "127.0.0.1:0", "--metrics-address", "off", *extra]


class ServerProcess:
    """A server subprocess; its stderr goes to a file, read for the bound port."""

    def __init__(self, python: str, pythonpath: str | None, extra: list[str]) -> None:
        env = dict(os.environ)
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        self.command = _server_command(python, env, extra)
        # kept open for the server's life, closed in stop()
        self.log = tempfile.NamedTemporaryFile("w+", prefix="normserve-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command, env=env, stdout=subprocess.DEVNULL, stderr=self.log
        )
        deadline = time.monotonic() + 90
        while True:
            match = LISTENING.search(Path(self.log.name).read_text())
            if match:
                self.address = f"{match[1]}:{match[2]}"
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                said = Path(self.log.name).read_text()
                self.stop()
                raise RuntimeError(f"server did not start: {said}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


# ---- measurements


def _us(hist: Any, q: float) -> float:
    return float(hist.get_value_at_percentile(q))


async def shapes(address: str, duration: float) -> dict[str, Any]:
    """S and M unary c1 p50 and c4 throughput, L stream TRAIN c1 (run_load, closed loop)."""
    out: dict[str, Any] = {}
    cases = [
        ("S", (64, 256), "unary", (1, 4)),
        ("M", (256, 1024), "unary", (1, 4)),
        ("L", (32, 64, 56, 56), "stream", (1,)),
    ]
    async with AsyncClient(address, timeout=30) as client:
        for name, shape, rpc, concurrencies in cases:
            sid = (await client.create_session(shape[1])).session_id
            calls = normserve_calls(
                client, sid, torch.randn(*shape), rpc=rpc, mode="train", timeout=10
            )
            for c in concurrencies:
                r = await run_load(calls, concurrency=c, duration=duration, warmup=0.5)
                out[f"{name}_c{c}"] = {
                    "shape": list(shape),
                    "rpc": rpc,
                    "p50_us": _us(r.histogram, 50),
                    "p99_us": _us(r.histogram, 99),
                    "rps": r.throughput_rps,
                    "errors": dict(r.errors),
                }
    return out


async def unary_latency(
    stub: pb_grpc.NormalizerStub, req: pb.NormalizeRequest, calls: int, budget: float
) -> dict[str, Any]:
    """``calls`` sequential Normalize calls (2 s timeout each), stopping early after ``budget``
    seconds or 5 failures in a row; latencies of successes, errors by status code."""
    lat: list[float] = []
    errors: Counter[str] = Counter()
    streak = 0
    t_end = time.perf_counter() + budget
    for _ in range(calls):
        if time.perf_counter() > t_end or streak >= 5:
            break
        t0 = time.perf_counter()
        try:
            await stub.Normalize(req, timeout=2)
            lat.append(time.perf_counter() - t0)
            streak = 0
        except grpc.aio.AioRpcError as err:
            errors[err.code().name] += 1
            streak += 1
    lat.sort()
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6 if lat else None  # noqa: E731
    return {"ok": len(lat), "errors": dict(errors), "p50_us": pick(0.5), "p99_us": pick(0.99)}


async def health_check(channel: grpc.aio.Channel) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
    except grpc.aio.AioRpcError as err:
        status = err.code().name
    return {"status": status, "ms": (time.perf_counter() - t0) * 1e3}


async def _idle(release: asyncio.Event) -> AsyncIterator[pb.NormalizeStreamRequest]:
    await release.wait()
    return
    yield


async def _parked(
    first: pb.NormalizeStreamRequest, release: asyncio.Event
) -> AsyncIterator[pb.NormalizeStreamRequest]:
    yield first
    await release.wait()


async def _end(call: grpc.aio.StreamStreamCall) -> str:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError:
        pass
    return (await call.code()).name


async def starvation(address: str, args: argparse.Namespace) -> dict[str, Any]:
    x = torch.randn(64, 256)
    async with AsyncClient(address, timeout=30) as client:
        unary_id = (await client.create_session(256)).session_id
        parked_id = (await client.create_session(256)).session_id
    req = pb.NormalizeRequest(session_id=unary_id, mode=pb.MODE_TRAIN, input=tensor_to_proto(x))
    first = pb.NormalizeStreamRequest(
        session_id=parked_id, mode=pb.MODE_TRAIN, chunk=tensor_to_proto(x[:8])
    )
    out: dict[str, Any] = {}
    channels = [grpc.aio.insecure_channel(address) for _ in range(5)]
    try:
        stub = pb_grpc.NormalizerStub(channels[0])
        await unary_latency(stub, req, 50, 10)  # warm-up
        out["unloaded"] = await unary_latency(stub, req, args.calls, 60)
        out["unloaded"]["health"] = await health_check(channels[0])

        release = asyncio.Event()
        load = [pb_grpc.NormalizerStub(ch) for ch in channels[1:]]
        calls = [load[i % 4].NormalizeStream(_idle(release)) for i in range(args.idle)]
        calls += [load[i % 4].NormalizeStream(_parked(first, release)) for i in range(args.parked)]
        await asyncio.sleep(args.settle)  # let the server take them in (or refuse them)
        ended = Counter([(await c.code()).name for c in calls if c.done()])
        loaded = await unary_latency(stub, req, args.calls, args.budget)
        loaded["health"] = await health_check(channels[0])
        loaded["streams_ended_early"] = dict(ended)
        try:
            got = await stub.GetSession(pb.GetSessionRequest(session_id=parked_id), timeout=5)
            loaded["get_session"] = f"OK (version {got.session.version})"
        except grpc.aio.AioRpcError as err:
            loaded["get_session"] = err.code().name
        out["loaded"] = loaded
        release.set()
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(_end(c)) for c in calls], timeout=30
        )
        out["loaded"]["stream_ends"] = dict(Counter(t.result() for t in done))
        if pending:
            out["loaded"]["stream_ends"]["still open after 30 s"] = len(pending)
            for c in calls:
                c.cancel()
    finally:
        for ch in channels:
            await ch.close()
    return out


# ---- report


def _fmt(us: float | None) -> str:
    return "-" if us is None else f"{us / 1e3:8.3f} ms"


def report(figures: dict[str, Any]) -> None:
    st = figures["starvation"]
    print(f"server: {' '.join(figures['server_command'])}")
    print(f"{'condition':<34} {'ok':>5} {'p50':>11} {'p99':>11}  health (Check time)  errors")
    for name, label in (
        ("unloaded", "unary [64,256] unloaded"),
        ("loaded", f"unary [64,256] +{figures['idle']} idle +{figures['parked']} parked"),
    ):
        r = st[name]
        h = r["health"]
        print(
            f"{label:<34} {r['ok']:>5} {_fmt(r['p50_us']):>11} {_fmt(r['p99_us']):>11}  "
            f"{h['status']} ({h['ms']:.1f} ms)  {r['errors'] or '-'}"
        )
    lo, un = st["loaded"]["p50_us"], st["unloaded"]["p50_us"]
    ratio = lo / un if lo and un else None
    figures["ratio_p50"] = ratio
    print(f"loaded/unloaded p50: {'-' if ratio is None else f'{ratio:.2f}x'}")
    print(
        f"under load: GetSession {st['loaded']['get_session']}; streams ended before the "
        f"measurement {st['loaded']['streams_ended_early'] or '-'}; at release "
        f"{st['loaded']['stream_ends']}"
    )
    for name, r in figures["shapes"].items():
        print(
            f"{name:<6} {r['rpc']:<6} {r['shape']!s:<18} p50 {_fmt(r['p50_us'])}  "
            f"p99 {_fmt(r['p99_us'])}  {r['rps']:9.1f} req/s  {r['errors'] or ''}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the server")
    p.add_argument(
        "--pythonpath",
        default=os.environ.get("NORMSERVE_BENCH_PYTHONPATH"),
        help="PYTHONPATH of the server (another installed build; env NORMSERVE_BENCH_PYTHONPATH)",
    )
    p.add_argument(
        "--server-arg", action="append", default=[], help="extra server flag (repeatable)"
    )
    p.add_argument("--calls", type=int, default=500, help="unary calls per condition (500)")
    p.add_argument("--idle", type=int, default=1000, help="streams that send nothing (1000)")
    p.add_argument("--parked", type=int, default=64, help="streams parked mid-batch (64)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds to open the streams (3)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds for the loaded calls (30)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per S/M/L run (4)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    args = p.parse_args(argv)

    server = ServerProcess(args.python, args.pythonpath, args.server_arg)
    try:
        figures: dict[str, Any] = {
            "server_command": server.command,
            "pythonpath": args.pythonpath,
            "idle": args.idle,
            "parked": args.parked,
            "cpus": os.cpu_count(),
        }
        figures["shapes"] = asyncio.run(shapes(server.address, args.duration))
        figures["starvation"] = asyncio.run(starvation(server.address, args))
    finally:
        server.stop()
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
