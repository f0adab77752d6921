"""The benchmark suite: normserve against its limits (torch compute, raw gRPC echo), in one run.

    python benchmarks/run.py [--quick] [--out docs/benchmarks.md] [--json results.json]

Starts a normserve server and the raw echo server (benchmarks/echo.py, normserve's server settings)
as subprocesses on free loopback ports and, with the load generator of ``normserve bench`` for both,
measures for workloads S [64,256], M [256,1024] and L [32,64,56,56] (float32):
  (a) the compute limit: torch's own batch norm in this process, per call, TRAIN and EVAL;
  (b) the transport limit: echo of the very bytes normserve is sent, unary and streamed;
  (c) normserve unary and streamed, TRAIN and EVAL, at concurrency 1 and 4;
plus throughput against concurrency for S and the server's peak RSS. It writes a markdown report and
prints a ratio summary with the targets (reported, never asserted). ``--quick`` is a ~10 s smoke run
of a subset whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from echo import KERNEL, STORE, STREAM, UNARY

from normserve.client import AsyncClient
from normserve.client.bench import (
    CallFactory,
    Result,
    encode_batch,
    fmt_us,
    git_commit,
    machine_info,
    normserve_calls,
    raw_stream,
    raw_unary,
    run_load,
    stream_calls,
    unary_calls,
)

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS: dict[str, tuple[int, ...]] = {
    "S": (64, 256),
    "M": (256, 1024),
    "L": (32, 64, 56, 56),
}
STREAM_ONLY = {"L"}  # 25.7 MB does not fit one message: streamed in ~1 MiB chunks only
SCAN = (1, 2, 4, 8, 16, 64)


@dataclass(frozen=True)
class Spec:
    """One measurement: ``server`` 'echo' or 'normserve' (or the floors 'kernel', unary, and
    'store', stream: see benchmarks/echo.py), ``rpc`` 'unary' or 'stream'."""

    workload: str
    server: str
    rpc: str
    mode: str  # 'train' / 'eval' for normserve; '-' for echo
    concurrency: int

    @property
    def key(self) -> str:
        return f"{self.workload}/{self.server}/{self.rpc}/{self.mode}/c{self.concurrency}"

    def limit(self) -> Spec:
        """The echo measurement this one is compared with."""
        return Spec(self.workload, "echo", self.rpc, "-", self.concurrency)


def plan(quick: bool) -> list[Spec]:
    specs: list[Spec] = []

    def add(*s: Spec) -> None:
        specs.extend(x for x in s if x not in specs)

    if quick:
        add(Spec("S", "echo", "unary", "-", 1), Spec("S", "echo", "stream", "-", 1))
        for mode in ("train", "eval"):
            add(Spec("S", "normserve", "unary", mode, 1), Spec("S", "normserve", "stream", mode, 1))
        add(Spec("S", "echo", "unary", "-", 4), Spec("S", "normserve", "unary", "train", 4))
        add(Spec("M", "echo", "unary", "-", 1), Spec("M", "normserve", "unary", "train", 1))
        add(Spec("L", "echo", "stream", "-", 1), Spec("L", "normserve", "stream", "train", 1))
        add(Spec("S", "echo", "unary", "-", 64), Spec("S", "normserve", "unary", "train", 64))
        add(Spec("S", "kernel", "unary", "-", 1), Spec("L", "store", "stream", "-", 1))
        return specs
    for wl in WORKLOADS:
        rpcs = ("stream",) if wl in STREAM_ONLY else ("unary", "stream")
        for conc in (1, 4):
            for rpc in rpcs:
                add(Spec(wl, "echo", rpc, "-", conc))
                for mode in ("train", "eval"):
                    add(Spec(wl, "normserve", rpc, mode, conc))
    for conc in SCAN:
        add(Spec("S", "echo", "unary", "-", conc), Spec("S", "normserve", "unary", "train", conc))
    for conc in (1, 4):  # the floors
        add(Spec("S", "kernel", "unary", "-", conc), Spec("M", "kernel", "unary", "-", conc))
        add(Spec("L", "store", "stream", "-", conc))
    return specs


# ---- servers as subprocesses


class Proc:
    """A server subprocess whose output is drained in the background once its address is known."""

    def __init__(self, cmd: list[str], stream: str, env: dict[str, str] | None = None) -> None:
        self.cmd = cmd
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if stream == "stderr" else None,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        self.pipe = self.proc.stdout if stream == "stdout" else self.proc.stderr
        self.address = ""

    def wait_address(self, timeout: float = 60.0) -> str:
        assert self.pipe is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.pipe.readline()
            self.lines.append(line)
            match = re.search(r"listening on (\S+?:\d+)", line)
            if match:
                self.address = match.group(1)
                threading.Thread(target=self._drain, daemon=True).start()
                return self.address
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(
            f"{' '.join(self.cmd)} did not report its address:\n{''.join(self.lines)}"
        )

    def _drain(self) -> None:
        assert self.pipe is not None
        for line in self.pipe:
            if len(self.lines) < 1000:
                self.lines.append(line)

    def memory_kib(self) -> dict[str, int]:
        """VmHWM (peak resident set) and VmRSS of the process, in KiB, from /proc."""
        out = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
        except OSError:
            pass
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- (a) the compute limit


def per_call_seconds(fn: Callable[[], Any], seconds: float) -> float:
    """Median time of one call, over batches of calls lasting ~10 ms each."""
    for _ in range(3):
        fn()
    n = 1
    while True:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t > 0.01 or n >= 1 << 16:
            break
        n *= 2
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times)


def ends_at(last: int) -> Callable[[Any, int], bool]:
    """``batch_done`` for a stream whose batch ends with its message number ``last``."""
    return lambda _, k: k == last


def compute_limit(shape: tuple[int, ...], seconds: float, device: str = "cpu") -> dict[str, float]:
    """torch's batch norm on the same batch, in this process, on ``device``: seconds per call,
    train and eval (on CUDA each call waits for its kernels, as a server's answer must)."""
    x = torch.randn(shape, device=device)
    ch = shape[1]
    mean, var = torch.zeros(ch, device=device), torch.ones(ch, device=device)
    weight, bias = torch.ones(ch, device=device), torch.zeros(ch, device=device)
    done = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def call(training: bool) -> None:
        F.batch_norm(x, mean, var, weight, bias, training, 0.1, 1e-5)
        done()

    with torch.no_grad():
        train = per_call_seconds(lambda: call(True), seconds)
        eval_ = per_call_seconds(lambda: call(False), seconds)
    return {"train": train, "eval": eval_}


# ---- (b), (c): load, with the same generator for echo and normserve


async def measure_all(
    specs: list[Spec],
    normserve_at: str,
    echo_at: str,
    duration: float,
    warmup: float,
    log: Callable[[str], None],
    quick: bool = False,
) -> dict[str, Result]:
    results: dict[str, Result] = {}
    inputs = {wl: torch.randn(shape) for wl, shape in WORKLOADS.items()}
    # One AsyncClient (one channel, the same options) per server: echo runs over the same machinery.
    async with AsyncClient(normserve_at, timeout=30) as ns, AsyncClient(echo_at, timeout=30) as ec:
        echo_unary = raw_unary(ec, UNARY)
        echo_stream = raw_stream(ec, STREAM)
        kernel_unary = raw_unary(ec, KERNEL)
        store_stream = raw_stream(ec, STORE)
        for i, spec in enumerate(specs, 1):
            x = inputs[spec.workload]
            session = await ns.create_session(x.shape[1])
            sid = session.session_id
            try:
                factory: CallFactory
                if spec.server == "normserve":
                    factory = normserve_calls(ns, sid, x, rpc=spec.rpc, mode=spec.mode, timeout=30)
                elif spec.server == "kernel":
                    wires = encode_batch(sid, x, "train", rpc="unary")
                    factory = unary_calls(kernel_unary, wires[0], timeout=30)
                elif spec.server == "store":
                    wires = encode_batch(sid, x, "train", rpc="stream")
                    last = len(wires) - 1
                    factory = stream_calls(
                        store_stream,
                        wires,
                        batch_done=ends_at(last),
                        timeout=30,
                    )
                else:
                    # The very bytes normserve is sent, echoed back without being parsed.
                    wires = encode_batch(sid, x, "train", rpc=spec.rpc)
                    if spec.rpc == "unary":

                        def same_length(response: bytes, n: int = len(wires[0])) -> None:
                            if len(response) != n:
                                raise ValueError(f"echo returned {len(response)} bytes, sent {n}")

                        factory = unary_calls(echo_unary, wires[0], timeout=30, check=same_length)
                    else:
                        last = len(wires) - 1
                        factory = stream_calls(
                            echo_stream,
                            wires,
                            batch_done=ends_at(last),
                            timeout=30,
                        )
                # A quick run's L batch may outlast its whole window: measure its first one.
                wu = 0.0 if quick and spec.workload in STREAM_ONLY else warmup
                result = await run_load(
                    factory,
                    concurrency=spec.concurrency,
                    duration=duration,
                    warmup=wu,
                    drain=30.0,
                    bytes_per_request=x.numel() * x.element_size(),
                    config={
                        "workload": spec.workload,
                        "server": spec.server,
                        "rpc": spec.rpc,
                        "mode": spec.mode,
                        "shape": list(x.shape),
                        "dtype": "float32",
                        "concurrency": spec.concurrency,
                        "duration_s": duration,
                        "warmup_s": wu,
                    },
                )
            finally:
                await ns.delete_session(sid)
            results[spec.key] = result
            lat = result.latency_us()
            errors = f"  errors {result.errors}" if result.errors else ""
            log(
                f"[{i:2}/{len(specs)}] {spec.key:<32} {result.throughput_rps:9,.1f} req/s "
                f"{result.throughput_mbps:8,.1f} MB/s  p50 {fmt_us(lat['p50']):>8}  "
                f"p99 {fmt_us(lat['p99']):>8}{errors}"
            )
    return results


# ---- ratios, targets, the report


def _get(results: dict[str, Result], spec: Spec) -> Result | None:
    return results.get(spec.key)


def ratios(
    results: dict[str, Result], compute: dict[str, dict[str, float]], spec: Spec
) -> dict[str, float | None]:
    """p50 / echo p50, throughput / echo throughput, and torch compute time / p50."""
    r, lim = _get(results, spec), _get(results, spec.limit())
    out: dict[str, float | None] = {"latency": None, "throughput": None, "compute_share": None}
    if r is None or not r.count:
        return out
    p50 = r.latency_us()["p50"]
    if lim is not None and lim.count:
        out["latency"] = p50 / lim.latency_us()["p50"]
        out["throughput"] = r.throughput_rps / lim.throughput_rps
    if spec.server == "normserve":
        out["compute_share"] = compute[spec.workload][spec.mode] * 1e6 / p50
    return out


def targets(
    results: dict[str, Result], compute: dict[str, dict[str, float]], rss_kib: int | None
) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/MISS/n/a)."""
    out: list[tuple[str, str, str]] = []

    def check(name: str, value: float | None, ok: Callable[[float], bool], shown: str) -> None:
        if value is None:
            out.append((name, "not measured", "n/a"))
        else:
            out.append((name, shown.format(value), "PASS" if ok(value) else "MISS"))

    for wl in ("S", "M"):
        lat = ratios(results, compute, Spec(wl, "normserve", "unary", "train", 1))["latency"]
        check(f"{wl} unary TRAIN c1 p50 <= 1.2x echo p50", lat, lambda v: v <= 1.2, "{:.2f}x")
    tput = ratios(results, compute, Spec("S", "normserve", "unary", "train", 4))["throughput"]
    check("S unary TRAIN c4 throughput >= 0.8x echo", tput, lambda v: v >= 0.8, "{:.2f}x")
    tput = ratios(results, compute, Spec("L", "normserve", "stream", "train", 1))["throughput"]
    check("L stream TRAIN c1 throughput >= 0.7x echo stream", tput, lambda v: v >= 0.7, "{:.2f}x")
    # The floors: what any Python server doing this job pays, measured the same way.
    for wl in ("S", "M"):
        floor = ratios(results, compute, Spec(wl, "kernel", "unary", "-", 1))["latency"]
        check(
            f"(floor) {wl} unary: bytes -> one torch kernel -> bytes, p50 / echo p50",
            floor,
            lambda v: v <= 1.2,
            "{:.2f}x",
        )
    floor = ratios(results, compute, Spec("L", "store", "stream", "-", 1))["throughput"]
    check(
        "(floor) L stream: store-and-forward echo throughput / echo",
        floor,
        lambda v: v >= 0.7,
        "{:.2f}x",
    )
    # A TRAIN batch also needs torch's own compute for it, on the same two cores: at best the
    # store-and-forward time plus that compute, as a throughput ratio to the echo.
    store = _get(results, Spec("L", "store", "stream", "-", 1))
    echo_l = _get(results, Spec("L", "echo", "stream", "-", 1))
    if store is not None and echo_l is not None and store.count and echo_l.count and "L" in compute:
        best = store.latency_us()["p50"] + compute["L"]["train"] * 1e6
        check(
            "(floor) L stream TRAIN: store-and-forward + torch compute, throughput / echo",
            echo_l.latency_us()["p50"] / best,
            lambda v: v >= 0.7,
            "{:.2f}x",
        )
    r64 = _get(results, Spec("S", "normserve", "unary", "train", 64))
    if r64 is None:
        out.append(("S unary TRAIN c64: no errors", "not measured", "n/a"))
        out.append(("S unary TRAIN c64: p99 reported", "not measured", "n/a"))
    else:
        errs = ", ".join(f"{k} {v}" for k, v in r64.errors.items()) or "0"
        out.append(("S unary TRAIN c64: no errors", errs, "MISS" if r64.errors else "PASS"))
        p99 = r64.latency_us()["p99"]
        out.append(("S unary TRAIN c64: p99 reported", fmt_us(p99), "PASS" if p99 else "MISS"))
    if rss_kib is None:
        out.append(("server peak RSS < 1 GiB", "not readable", "n/a"))
    else:
        mib = rss_kib / 1024
        out.append(("server peak RSS < 1 GiB", f"{mib:.0f} MiB", "PASS" if mib < 1024 else "MISS"))
    return out


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "" if v is None else f"{100 * v:.0f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def workload_rows(
    wl: str, specs: list[Spec], results: dict[str, Result], compute: dict[str, dict[str, float]]
) -> list[list[str]]:
    rows = []
    for spec in specs:
        if spec.workload != wl or spec.concurrency not in (1, 4):
            continue
        r = _get(results, spec)
        if r is None:
            continue
        lat = r.latency_us()
        rat = ratios(results, compute, spec)
        name = {
            "echo": "echo",
            "kernel": "floor: one torch kernel",
            "store": "floor: store-and-forward echo",
        }.get(spec.server, f"normserve {spec.mode.upper()}")
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        rows.append(
            [
                f"{name} {spec.rpc}",
                str(spec.concurrency),
                f"{r.throughput_rps:,.1f}",
                f"{r.throughput_mbps:,.0f}",
                fmt_us(lat["p50"]),
                fmt_us(lat["p99"]),
                fmt_us(lat["p99.9"]),
                errors,
                _x(rat["latency"]) if spec.server != "echo" else "1.00x",
                _x(rat["throughput"]) if spec.server != "echo" else "1.00x",
                _pct(rat["compute_share"]),
            ]
        )
    return rows


WL_HEADER = [
    "measurement",
    "conc",
    "req/s",
    "MB/s",
    "p50",
    "p99",
    "p99.9",
    "errors",
    "p50 / echo p50",
    "req/s / echo req/s",
    "compute share of p50",
]


def scan_rows(results: dict[str, Result]) -> list[list[str]]:
    rows = []
    for conc in SCAN:
        e = _get(results, Spec("S", "echo", "unary", "-", conc))
        n = _get(results, Spec("S", "normserve", "unary", "train", conc))
        if e is None or n is None:
            continue
        le, ln = e.latency_us(), n.latency_us()
        errors = ", ".join(f"{k} {v}" for k, v in {**e.errors, **n.errors}.items()) or "0"
        rows.append(
            [
                str(conc),
                f"{e.throughput_rps:,.0f}",
                fmt_us(le["p50"]),
                fmt_us(le["p99"]),
                f"{n.throughput_rps:,.0f}",
                fmt_us(ln["p50"]),
                fmt_us(ln["p99"]),
                _x(n.throughput_rps / e.throughput_rps if e.throughput_rps else None),
                errors,
            ]
        )
    return rows


SCAN_HEADER = [
    "conc",
    "echo req/s",
    "echo p50",
    "echo p99",
    "normserve req/s",
    "normserve p50",
    "normserve p99",
    "req/s ratio",
    "errors",
]


def report(
    specs: list[Spec],
    results: dict[str, Result],
    compute: dict[str, dict[str, float]],
    memory: dict[str, int],
    machine: dict[str, Any],
    meta: dict[str, Any],
) -> str:
    mem_gib = (machine.get("memory_bytes") or 0) / 2**30
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/run.py{' --quick' if meta['quick'] else ''}` on "
        f"{meta['date']}, in {meta['runtime_s']:.0f} s: {meta['duration']:g} s per measurement "
        f"after {meta['warmup']:g} s of warm-up. Every number here comes from that one run; "
        "rerun the script to refresh them (see the end).",
        "",
    ]
    if meta["quick"]:
        lines += ["**This is a `--quick` smoke run: its numbers are not measurements.**", ""]
    lines += [
        "## Machine and versions",
        "",
        *_table(
            ["CPU", "cores", "RAM", "load average (1 min) at start / end", "server device"],
            [
                [
                    str(machine.get("cpu_model")),
                    str(machine.get("cpu_count")),
                    f"{mem_gib:.1f} GiB",
                    f"{meta['load_start']:.2f} / {meta['load_end']:.2f}",
                    str(meta["device_name"]),
                ]
            ],
        ),
        "",
        *_table(
            ["python", "torch", "grpcio", "protobuf", "normserve", "commit"],
            [
                [
                    str(machine.get("python")),
                    str(machine.get("torch")),
                    str(machine.get("grpcio")),
                    str(machine.get("protobuf")),
                    str(machine.get("normserve")),
                    str(meta["commit"]),
                ]
            ],
        ),
        "",
        "Client and servers share the machine's cores, so every figure includes the client's "
        "own cost; other work on the machine (see the load average) makes the numbers noisier.",
        "",
        "## How to read it",
        "",
        f"- **normserve**: `python -m normserve serve --device {meta['device']}` (default "
        "settings) in a "
        "subprocess, one fresh session per measurement, the same float32 batch sent every time.",
        "- **echo** (the transport limit): `benchmarks/echo.py`, a gRPC server with normserve's "
        "settings (16 worker threads, 16 MiB messages, no SO_REUSEPORT) that returns the raw "
        "request bytes unparsed. It is sent the very bytes normserve is sent: for streams the "
        "same ~1 MiB chunks (L: 32 chunks of 784 KiB).",
        "- **compute** (the compute limit): torch's `F.batch_norm` on the same batch in this "
        "process, per call: "
        + ", ".join(
            f"{wl} TRAIN {fmt_us(v['train'] * 1e6)} / EVAL {fmt_us(v['eval'] * 1e6)}"
            for wl, v in compute.items()
        )
        + ".",
        "- Both servers are driven by the load generator of `normserve bench` (asyncio, one "
        "`AsyncClient` channel per server, closed loop with `conc` callers; a stream stays open "
        "per caller and carries one batch at a time). Requests are encoded once and answers are "
        "checked but not decoded into tensors, so the client spends the same on both servers. "
        "Latency is from sending a batch to its complete answer; MB/s counts input tensor bytes.",
        "- Ratios: *p50 / echo p50* and *req/s / echo req/s* compare with echo at the same "
        "concurrency and RPC kind; *compute share* is torch's own time for the batch as a "
        "share of normserve's p50.",
        "- **Floors** (also in `benchmarks/echo.py`, driven the same way): *one torch kernel* "
        "views the batch in the request, runs a single fused torch batch-norm kernel and sends "
        "the output back (no sessions, no running statistics, no checks, no metrics): the least "
        "any Python server must do per unary batch. *store-and-forward echo* holds each "
        "streamed batch until its last chunk and then echoes it: what statistics over the whole "
        "batch impose on a stream before any computing. A target below its floor cannot be met "
        "by this design on this machine; the gap between normserve and its floor is what "
        "normserve itself costs.",
        "",
        "## Targets (reported, not asserted)",
        "",
        *_table(["target", "measured", "verdict"], [list(t) for t in meta["targets"]]),
        "",
    ]
    for wl, shape in WORKLOADS.items():
        rows = workload_rows(wl, specs, results, compute)
        if not rows:
            continue
        nbytes = 4
        for d in shape:
            nbytes *= d
        title = f"## Workload {wl}: {list(shape)} float32 ({nbytes / 2**20:.2f} MiB)"
        note = " - streamed in chunks only (too large for one message)" if wl in STREAM_ONLY else ""
        lines += [title + note, "", *_table(WL_HEADER, rows), ""]
    srows = scan_rows(results)
    if srows:
        lines += [
            "## Throughput against concurrency (S, unary; normserve TRAIN on one session)",
            "",
            *_table(SCAN_HEADER, srows),
            "",
        ]
    hwm = memory.get("VmHWM")
    lines += [
        "## Server memory",
        "",
        f"normserve server peak resident set (VmHWM) at the end of the run: {hwm / 1024:.0f} MiB"
        if hwm
        else "normserve server peak RSS: not readable here",
        "",
        "## Rerun",
        "",
        "```bash",
        "python benchmarks/run.py                      # full suite (a few minutes), writes this file",
        "python benchmarks/run.py --quick --out /tmp/b.md  # ~10 s smoke run (CI), numbers meaningless",
        "python benchmarks/run.py --json results.json  # also every result, HDR histograms included",
        "normserve bench --help                        # the load tool on its own",
        "```",
        "",
    ]
    return "\n".join(lines)


def summary_text(
    specs: list[Spec],
    results: dict[str, Result],
    compute: dict[str, dict[str, float]],
    tgts: list[tuple[str, str, str]],
) -> str:
    rows = []
    for spec in specs:
        if spec.server == "echo":
            continue
        r = _get(results, spec)
        if r is None:
            continue
        rat = ratios(results, compute, spec)
        rows.append(
            [
                spec.workload,
                spec.rpc,
                spec.mode.upper() if spec.server == "normserve" else f"({spec.server})",
                str(spec.concurrency),
                fmt_us(r.latency_us()["p50"]),
                _x(rat["latency"]),
                f"{r.throughput_rps:,.1f}",
                _x(rat["throughput"]),
                _pct(rat["compute_share"]),
                str(r.error_count),
            ]
        )
    header = [
        "wl",
        "rpc",
        "mode",
        "conc",
        "p50",
        "p50/echo",
        "req/s",
        "req/s/echo",
        "compute",
        "err",
    ]
    return (
        "ratios to the limits (normserve / echo, same rpc and concurrency)\n"
        + _text_table(header, rows)
        + "\n\ntargets\n"
        + _text_table(["target", "measured", "verdict"], [list(t) for t in tgts])
    )


#: docs/benchmarks.md keeps this script's report between these lines, under its own summary.
REPORT_BEGIN = "<!-- BEGIN benchmarks/run.py report -->"
REPORT_END = "<!-- END benchmarks/run.py report -->"


def place_report(out: Path, text: str) -> str:
    """The file to write: ``text`` alone, or, when ``out`` already holds the markers, ``out`` with
    the report between them replaced (its headings two levels down), so a rerun refreshes the
    detailed report and keeps what the file says around it."""
    old = out.read_text() if out.exists() else ""
    if REPORT_BEGIN not in old or REPORT_END not in old:
        return text
    head, _, rest = old.partition(REPORT_BEGIN)
    _, _, tail = rest.partition(REPORT_END)
    demoted = re.sub(r"(?m)^(#+) ", r"##\1 ", text.strip())  # "# Benchmarks" -> "###"
    demoted = demoted.replace(
        "### Benchmarks", "### Latency and throughput report (`benchmarks/run.py`)", 1
    )
    return f"{head}{REPORT_BEGIN}\n{demoted}\n{REPORT_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~10 s smoke run (CI); numbers meaningless")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where the server's sessions (and the compute limit) run; cuda writes "
        "docs/benchmarks-gpu.md unless --out says otherwise",
    )
    p.add_argument("--out", help="markdown report (docs/benchmarks.md; with cuda, -gpu.md)")
    p.add_argument("--json", help="also write every result (with its HDR histogram) here")
    p.add_argument("--duration", type=float, help="seconds per measurement (3; quick 0.2)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per measurement (1; quick 0.1)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    if args.out is None:
        args.out = str(ROOT / "docs" / f"benchmarks{'-gpu' if args.device == 'cuda' else ''}.md")
    duration = args.duration or (0.2 if args.quick else 3.0)
    warmup = args.warmup if args.warmup is not None else (0.1 if args.quick else 1.0)
    specs = plan(args.quick)
    started = time.monotonic()
    load_start = os.getloadavg()[0]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    normserve = Proc(
        [sys.executable, "-m", "normserve.server", "--address", "127.0.0.1:0", "--device",
         args.device, "--grace-seconds", "1"],
        "stderr",
        env={"NORMSERVE_METRICS_ADDRESS": "127.0.0.1:0"},  # never collide with a running server
    )  # fmt: skip
    echo = Proc([sys.executable, str(ROOT / "benchmarks" / "echo.py")], "stdout")
    try:
        ns_at, echo_at = normserve.wait_address(), echo.wait_address()
        log(f"normserve on {ns_at}, echo on {echo_at}; {len(specs)} measurements")
        workloads = {wl: s for wl, s in WORKLOADS.items() if any(x.workload == wl for x in specs)}
        compute = {
            wl: compute_limit(s, 0.02 if args.quick else 0.5, args.device)
            for wl, s in workloads.items()
        }
        for wl, v in compute.items():
            log(f"compute {wl}: TRAIN {fmt_us(v['train'] * 1e6)}, EVAL {fmt_us(v['eval'] * 1e6)}")
        results = asyncio.run(measure_all(specs, ns_at, echo_at, duration, warmup, log, args.quick))
        memory = normserve.memory_kib()
    finally:
        normserve.stop()
        echo.stop()
    tgts = targets(results, compute, memory.get("VmHWM"))
    machine = machine_info()
    meta = {
        "quick": args.quick,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": time.monotonic() - started,
        "duration": duration,
        "warmup": warmup,
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "commit": git_commit(ROOT),
        "targets": tgts,
        "device": args.device,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(place_report(out, report(specs, results, compute, memory, machine, meta)))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "machine": machine,
                    "meta": meta,
                    "compute_s": compute,
                    "server_memory_kib": memory,
                    "results": {k: r.to_dict() for k, r in results.items()},
                },
                indent=2,
            )
            + "\n"
        )
    print(summary_text(specs, results, compute, tgts))
    print(
        f"\nwrote {out} in {meta['runtime_s']:.0f} s "
        f"(load average {meta['load_start']:.2f} at start, {meta['load_end']:.2f} at end)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
