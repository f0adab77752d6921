"""What keeping sessions outside one process's memory costs, and what --processes N buys.

    python benchmarks/stores.py [--quick] [--out docs/benchmarks.md] [--json stores.json]
                                [--processes-list 1,2] [--client-processes K] [--rounds 3]

Starts a real redis-server (``appendonly yes``; ``appendfsync everysec``, and a second one with
``always``) and normserve servers (``python -m normserve.server``, run.py's ``Proc``) on free
loopback ports, and measures [64, 256] float32 unary TRAIN calls, each carrying its own
idempotency key as the Python client sends one:

  (A) one session, at concurrency 1 (p50, p99, req/s) and 16 (req/s, p50), for the memory store,
      the local durable store (``--state-dir``, ``--durability interval`` and ``strict``) and
      the Redis store: what strict costs against interval and memory, and Redis's p50 overhead
      at concurrency 1 against memory (target: at most 15%);
  (B) 64 sessions at concurrency 64 (caller k on session k), for ``--processes N`` on the Redis
      store for each N of --processes-list, and single processes of the memory and local stores
      as references: req/s, the speedup over N = 1, p50, p99, and the CPU each part used.

Every measurement is taken --rounds times, the stores alternating (the order rotates each round),
and the median round is reported, so a change of load on the machine hits all of them alike.
With ``--out`` the report replaces the part of that file between this script's markers, and the
throughput plot is written beside it (``img/stores_processes.png``). ``--quick`` is a ~30 s smoke
run whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime as dt
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from run import Proc  # benchmarks/run.py, beside this script

from normserve.client import AsyncClient, NormserveError
from normserve.client.bench import (
    BadResponse,
    Call,
    CallFactory,
    Result,
    fmt_us,
    git_commit,
    machine_info,
    new_histogram,
    raw_unary,
    run_load,
)
from normserve.v1 import normserve_pb2 as pb
from normserve.wire import encode_normalize_request

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (64, 256)
NORMALIZE = "/normserve.v1.Normalizer/Normalize"
SINGLE_CONCURRENCY = (1, 16)
SCALE_SESSIONS = 64
SCALE_CONCURRENCY = 64
REDIS_TARGET = 0.15  # the Redis store's p50 at concurrency 1 over the memory store's, at most
REPORT_BEGIN = "<!-- BEGIN benchmarks/stores.py report -->"
REPORT_END = "<!-- END benchmarks/stores.py report -->"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---- the CPU each process used, from /proc


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # fields 3.. (the name may hold spaces)


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU seconds of one process (all its threads)."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def children_of(ppid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            f = _stat_fields(int(d.name))
            if f is not None and int(f[1]) == ppid:
                out.append(int(d.name))
    return sorted(out)


# ---- servers


@dataclass(frozen=True)
class Config:
    """One server setup. ``store``: 'memory', 'interval', 'strict' or 'redis' (``fsync`` says
    which redis-server); ``processes`` > 1 only with Redis."""

    store: str
    processes: int = 1
    fsync: str = ""

    @property
    def name(self) -> str:
        base = {"interval": "local interval", "strict": "local strict"}.get(self.store, self.store)
        if self.store == "redis":
            base = f"redis ({self.fsync})"
        return base if self.processes == 1 else f"{base} x{self.processes}"


class Server:
    """A normserve server subprocess (a parent and its children with ``--processes``)."""

    def __init__(self, config: Config, args: list[str]) -> None:
        self.config = config
        cmd = [
            sys.executable, "-m", "normserve.server", "--address", "127.0.0.1:0",
            "--metrics-address", "off", "--device", "cpu", "--grace-seconds", "1", *args,
        ]  # fmt: skip
        if config.processes > 1:
            cmd += ["--processes", str(config.processes)]
        self.proc = Proc(cmd, "stderr")
        self.address = ""
        self.workers: list[int] = []  # the pids that serve calls

    def wait(self, timeout: float = 120.0) -> str:
        """Waits until every process is listening; returns the address."""
        deadline = time.monotonic() + timeout
        self.address = self.proc.wait_address(timeout)
        while sum("listening on" in line for line in self.proc.lines) < self.config.processes:
            if self.proc.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.config.name}: not all {self.config.processes} processes started:\n"
                    + "".join(self.proc.lines[-40:])
                )
            time.sleep(0.05)
        pid = self.proc.proc.pid
        self.workers = children_of(pid) if self.config.processes > 1 else [pid]
        if len(self.workers) != self.config.processes:
            raise RuntimeError(f"{self.config.name}: found processes {self.workers}")
        return self.address

    def stop(self) -> None:
        kids = children_of(self.proc.proc.pid) if self.proc.proc.poll() is None else []
        self.proc.stop()
        for pid in kids:  # the parent forwards SIGTERM; a child left behind is killed
            if cpu_seconds(pid) is not None:
                with suppress(OSError):
                    os.kill(pid, 9)


def redis_binary(given: str | None) -> str:
    """The redis-server to run, or SystemExit saying how to get one."""
    found = given or os.environ.get("NORMSERVE_REDIS_SERVER") or shutil.which("redis-server")
    if not found or not os.access(found, os.X_OK):
        raise SystemExit(
            "benchmarks/stores.py needs redis-server: install Debian's redis-server package, or "
            "unpack it (dpkg -x) and pass --redis-server PATH (or set NORMSERVE_REDIS_SERVER) "
            f"to its usr/bin/redis-server. Looked for: {found or 'redis-server on the PATH'}"
        )
    return found


def start_redis(directory: Path, appendfsync: str) -> Any:
    """tests/_redis.py's RedisServer (AOF on, a free loopback port), started."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests._redis import RedisServer

    server = RedisServer(directory, appendfsync=appendfsync)
    server.start()
    return server


def redis_cpu_seconds(url: str) -> float | None:
    import redis

    try:
        info = redis.Redis.from_url(url, socket_timeout=2).info("cpu")
    except redis.RedisError:
        return None
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# ---- load: unary TRAIN, a fresh idempotency key per request


def train_calls(clients: Sequence[AsyncClient], session_ids: Sequence[str], x: Any) -> CallFactory:
    """Callers of unary TRAIN: caller k uses channel k % channels and session k % sessions.

    The request is encoded per call (a few us) because each carries its own idempotency key, as
    the Python client's do: the stores remember every key, so a keyless load would flatter them.
    """
    methods = [raw_unary(c, NORMALIZE) for c in clients]
    nbytes = x.numel() * x.element_size()
    entered = itertools.count()

    @asynccontextmanager
    async def factory() -> AsyncIterator[Call]:
        k = next(entered)
        method, sid = methods[k % len(methods)], session_ids[k % len(session_ids)]

        async def call() -> None:
            request = encode_normalize_request(sid, pb.MODE_TRAIN, x, False, uuid.uuid4().hex)
            try:
                response = await method(request, timeout=30)
            except grpc.RpcError as err:
                raise NormserveError(err.code(), err.details() or "") from None
            if len(response) < nbytes:
                raise BadResponse(f"a {len(response)}-byte answer to a {nbytes}-byte batch")

        yield call

    return factory


@dataclass
class Load:
    """One closed-loop run, picklable for a client process."""

    target: str
    session_ids: list[str]
    concurrency: int
    channels: int
    duration: float
    warmup: float
    start_at: float = 0.0  # time.time() at which to start (client processes start together)


async def _drive(load: Load) -> dict[str, Any]:
    x = torch.randn(SHAPE)
    # a local subchannel pool per channel: without it grpc shares one connection between
    # channels to the same target, and the kernel could not spread them over the processes
    clients = [
        AsyncClient(load.target, timeout=30, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(load.channels)
    ]
    try:
        for client in clients:  # connect each channel (and check the session is there)
            await client.get_session(load.session_ids[0])
        delay = load.start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        marks: list[tuple[float, float]] = []  # (wall clock, this process's CPU seconds)

        def mark() -> None:
            marks.append((time.time(), time.process_time()))

        loop.call_later(load.warmup, mark)
        loop.call_later(load.warmup + load.duration, mark)
        result = await run_load(
            train_calls(clients, load.session_ids, x),
            concurrency=load.concurrency,
            duration=load.duration,
            warmup=load.warmup,
            drain=30.0,
            bytes_per_request=x.numel() * x.element_size(),
        )
    finally:
        for client in clients:
            await client.close()
    if len(marks) < 2:  # the run ended early (it failed)
        return {"result": result.to_dict(), "client_cores": None, "window": None}
    (t0, c0), (t1, c1) = marks
    return {"result": result.to_dict(), "client_cores": (c1 - c0) / (t1 - t0), "window": (t0, t1)}


def client_process(load: Load) -> dict[str, Any]:
    """Runs one load in a client process (the pool's entry point)."""
    return asyncio.run(_drive(load))


def _warm(_: int) -> int:
    time.sleep(0.5)  # keeps this worker busy so each warm-up task lands on a different one
    return os.getpid()


def merge(parts: list[dict[str, Any]]) -> tuple[Result, float | None]:
    """One result from the client processes' results, and the cores the clients used."""
    results = [Result.from_dict(p["result"]) for p in parts]
    if len(results) == 1:
        merged = results[0]
    else:
        h = new_histogram()
        errors: dict[str, int] = {}
        for r in results:
            h.add(r.histogram)
            for k, v in r.errors.items():
                errors[k] = errors.get(k, 0) + v
        rps = sum(r.throughput_rps for r in results)
        count = int(h.get_total_count())
        merged = Result(
            histogram=h,
            elapsed_s=count / rps if rps else statistics.mean(r.elapsed_s for r in results),
            errors=errors,
            error_messages={k: v for r in results for k, v in r.error_messages.items()},
            bytes_per_request=results[0].bytes_per_request,
        )
    cores = [p["client_cores"] for p in parts]
    return merged, (None if None in cores else sum(cores))


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores of the machine spent busy (not idle, not waiting for I/O)."""
    try:
        first = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Sample:
    at: float  # time.time()
    servers: list[float | None]  # CPU seconds of each server process
    redis: list[float | None]  # CPU seconds of each redis-server
    machine: float | None  # busy CPU seconds of the whole machine


class Sampler(threading.Thread):
    """CPU seconds of the servers' processes, of redis and of the whole machine every 0.1 s until
    stopped, so the cores each used can be read over the window the client measured."""

    def __init__(self, pids: list[int], redis_urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.pids, self.redis_urls = pids, redis_urls
        self.samples: list[Sample] = []
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append(
                Sample(
                    time.time(),
                    [cpu_seconds(p) for p in self.pids],
                    [redis_cpu_seconds(u) for u in self.redis_urls],
                    machine_busy_seconds(),
                )
            )
            if self.done.wait(0.1):
                return

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)

    def cores(self, start: float, end: float) -> dict[str, Any]:
        """Cores used between the first sample at or after ``start`` and the last at or before
        ``end`` (wall-clock times): by each server process, by redis, by the whole machine."""
        inside = [x for x in self.samples if start <= x.at <= end]
        if len(inside) < 2:
            return {}
        a, b = inside[0], inside[-1]
        wall = b.at - a.at

        def rate(x: float | None, y: float | None) -> float | None:
            return None if x is None or y is None else (y - x) / wall

        per = [rate(x, y) for x, y in zip(a.servers, b.servers, strict=True)]
        redis = [rate(x, y) for x, y in zip(a.redis, b.redis, strict=True)]
        return {
            "server_cores": None if None in per else per,
            "redis_cores": None if not redis or None in redis else sum(r or 0.0 for r in redis),
            "machine_cores": rate(a.machine, b.machine),
        }


@dataclass
class Round:
    """One measurement of one config."""

    config: str
    concurrency: int
    round: int
    summary: dict[str, Any]
    client_cores: float | None = None  # the client processes' CPU seconds per second
    server_cores: list[float] | None = None  # each normserve process's
    redis_cores: float | None = None  # redis-server's
    machine_cores: float | None = None  # the whole machine's (busy, all processes)

    @property
    def other_cores(self) -> float | None:
        """What processes other than this benchmark's used of the machine meanwhile."""
        if self.machine_cores is None or self.client_cores is None or self.server_cores is None:
            return None
        ours = self.client_cores + sum(self.server_cores) + (self.redis_cores or 0.0)
        return max(0.0, self.machine_cores - ours)

    @property
    def rps(self) -> float:
        return float(self.summary["throughput_rps"])

    def lat(self, key: str) -> float:
        return float(self.summary["latency_us"][key])


class Bench:
    """Runs loads against the servers, in this process or in client processes, and keeps every
    round measured."""

    def __init__(self) -> None:
        self.rounds: list[Round] = []
        self.redis_urls: list[str] = []  # whose CPU to count in the next measurements
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def start_clients(self, count: int) -> None:
        """Starts ``count`` client processes (spawned: no torch or grpc state forked)."""
        if count > 1:
            self.pool = concurrent.futures.ProcessPoolExecutor(
                count, mp_context=multiprocessing.get_context("spawn")
            )
            pids = set(self.pool.map(_warm, range(count)))
            log(f"{len(pids)} client processes ready")

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def measure(
        self,
        server: Server,
        session_ids: list[str],
        concurrency: int,
        channels: int,
        duration: float,
        warmup: float,
        rnd: int,
        clients: int = 1,
    ) -> Round:
        """One closed-loop run of ``concurrency`` callers over ``channels`` channels, split over
        ``clients`` client processes."""
        start_at = time.time() + (2.0 if clients > 1 else 0.5)
        loads = []
        per = math.ceil(concurrency / clients)
        for i in range(clients):
            n = min(per, concurrency - i * per)
            loads.append(
                Load(
                    server.address,
                    session_ids[i * per : i * per + n] or session_ids,
                    n,
                    max(1, math.ceil(channels / clients)),
                    duration,
                    warmup,
                    start_at,
                )
            )
        redis_urls = self.redis_urls if server.config.store == "redis" else []
        sampler = Sampler(server.workers, redis_urls)
        sampler.start()
        try:
            if clients > 1:
                assert self.pool is not None
                parts = list(self.pool.map(client_process, loads))
            else:
                parts = [client_process(loads[0])]
        finally:
            sampler.stop()
        result, client_cores = merge(parts)
        windows = [p["window"] for p in parts]
        cores: dict[str, Any] = {}
        if None not in windows:  # the span every client process measured
            cores = sampler.cores(max(w[0] for w in windows), min(w[1] for w in windows))
        r = Round(
            server.config.name,
            concurrency,
            rnd,
            result.summary(),
            client_cores,
            **cores,
        )
        self.rounds.append(r)
        lat = result.latency_us()
        errors = f"  errors {result.errors}" if result.errors else ""
        log(
            f"  round {rnd + 1} {server.config.name:<22} c{concurrency:<3} "
            f"{result.throughput_rps:8,.0f} req/s  p50 {fmt_us(lat['p50']):>8}  "
            f"p99 {fmt_us(lat['p99']):>8}{errors}"
        )
        return r


async def create_sessions(target: str, count: int) -> list[str]:
    async with AsyncClient(target, timeout=30) as client:
        return [(await client.create_session(SHAPE[1])).session_id for _ in range(count)]


def start_servers(
    configs: list[Config], state_root: Path, redis_url: dict[str, str], db: itertools.count[int]
) -> dict[Config, Server]:
    servers: dict[Config, Server] = {}
    for cfg in configs:
        if cfg.store == "memory":
            args: list[str] = []
        elif cfg.store in ("interval", "strict"):
            d = Path(tempfile.mkdtemp(prefix=f"{cfg.store}-", dir=state_root))
            args = ["--state-dir", str(d), "--durability", cfg.store]
        else:  # each server on a database of its own, so none sees another's sessions
            url = redis_url[cfg.fsync].rsplit("/", 1)[0] + f"/{next(db)}"
            args = ["--store", url]
        servers[cfg] = Server(cfg, args)
    for server in servers.values():
        server.wait()
        log(f"{server.config.name} on {server.address} (pids {server.workers})")
    return servers


def rotate(items: list[Config], k: int) -> list[Config]:
    k %= len(items)
    return items[k:] + items[:k]


# ---- figures


def median_of(rounds: list[Round], config: str, conc: int) -> dict[str, Any] | None:
    rs = [r for r in rounds if r.config == config and r.concurrency == conc]
    if not rs:
        return None

    def med(values: list[float | None]) -> float | None:
        vals = [v for v in values if v is not None]
        return statistics.median(vals) if vals else None

    server = [sum(r.server_cores) if r.server_cores else None for r in rs]
    per_proc = [r.server_cores for r in rs if r.server_cores]
    return {
        "rounds": len(rs),
        "rps": med([r.rps for r in rs]),
        "rps_min": min(r.rps for r in rs),
        "rps_max": max(r.rps for r in rs),
        "p50_us": med([r.lat("p50") for r in rs]),
        "p99_us": med([r.lat("p99") for r in rs]),
        "p50_us_rounds": [r.lat("p50") for r in rs],
        "rps_rounds": [r.rps for r in rs],
        "errors": sum(sum(r.summary["errors"].values()) for r in rs),
        "error_kinds": sorted({k for r in rs for k in r.summary["errors"]}),
        "client_cores": med([r.client_cores for r in rs]),
        "server_cores": med(server),
        "redis_cores": med([r.redis_cores for r in rs]),
        "other_cores": med([r.other_cores for r in rs]),
        "server_us_per_call": med(
            [sum(r.server_cores) / r.rps * 1e6 if r.server_cores and r.rps else None for r in rs]
        ),
        # balance over processes: the least and most busy process, median over rounds
        "process_cores_min": med([min(p) for p in per_proc]),
        "process_cores_max": med([max(p) for p in per_proc]),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def paired(rounds: list[Round], a: str, b: str, conc: int, key: str) -> list[float]:
    """Per-round ratios a/b of a latency percentile (``key``) or of req/s (``key='rps'``)."""
    out = []
    for rnd in sorted({r.round for r in rounds}):
        ra = [r for r in rounds if r.config == a and r.concurrency == conc and r.round == rnd]
        rb = [r for r in rounds if r.config == b and r.concurrency == conc and r.round == rnd]
        if ra and rb:
            va = ra[0].rps if key == "rps" else ra[0].lat(key)
            vb = rb[0].rps if key == "rps" else rb[0].lat(key)
            if vb:
                out.append(va / vb)
    return out


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * (v - 1):+.0f}%"


def _f(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def _us(v: float | None) -> str:
    return "n/a" if v is None else fmt_us(v)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def single_table(figs: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "store", "c1 p50", "c1 p99", "c1 req/s", "c16 req/s", "c16 p50",
        "c1 p50 / memory", "c16 req/s / memory", "server CPU per call (c1 / c16)",
        "other load (c1 / c16)", "errors",
    ]  # fmt: skip
    mem1, mem16 = figs["memory"]["c1"], figs["memory"]["c16"]
    rows = []
    for name, f in figs.items():
        c1, c16 = f["c1"], f["c16"]
        rows.append(
            [
                name,
                _us(c1["p50_us"]),
                _us(c1["p99_us"]),
                _f(c1["rps"]),
                _f(c16["rps"]),
                _us(c16["p50_us"]),
                _x(ratio(c1["p50_us"], mem1["p50_us"])),
                _x(ratio(c16["rps"], mem16["rps"])),
                f"{_us(c1['server_us_per_call'])} / {_us(c16['server_us_per_call'])}",
                f"{_f(c1['other_cores'], '{:.2f}')} / {_f(c16['other_cores'], '{:.2f}')}",
                str(c1["errors"] + c16["errors"]),
            ]
        )
    return header, rows


def scale_table(figs: dict[str, Any], base: str, memory: str) -> tuple[list[str], list[list[str]]]:
    header = [
        "server", "processes", "req/s (min-max of rounds)", "vs redis x1", "vs memory x1",
        "p50", "p99", "cores: client / normserve / redis", "per process (least-most busy)",
        "normserve CPU per call", "other load", "errors",
    ]  # fmt: skip
    rows = []
    for name, f in figs.items():
        rows.append(
            [
                name,
                str(f["processes"]),
                f"{_f(f['rps'])} ({_f(f['rps_min'])}-{_f(f['rps_max'])})",
                _x(ratio(f["rps"], figs[base]["rps"])) if base in figs else "n/a",
                _x(ratio(f["rps"], figs[memory]["rps"])) if memory in figs else "n/a",
                _us(f["p50_us"]),
                _us(f["p99_us"]),
                f"{_f(f['client_cores'], '{:.2f}')} / {_f(f['server_cores'], '{:.2f}')} / "
                + (_f(f["redis_cores"], "{:.2f}") if f["store"] == "redis" else "-"),
                f"{_f(f['process_cores_min'], '{:.2f}')}-{_f(f['process_cores_max'], '{:.2f}')}"
                if f["processes"] > 1
                else "-",
                _us(f["server_us_per_call"]),
                _f(f["other_cores"], "{:.2f}"),
                str(f["errors"]) + (f" ({', '.join(f['error_kinds'])})" if f["errors"] else ""),
            ]
        )
    return header, rows


def plot(
    path: Path, scale: dict[str, Any], redis_names: list[str], memory: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ns = [scale[n]["processes"] for n in redis_names]
    rps = [scale[n]["rps"] for n in redis_names]
    lo = [scale[n]["rps"] - scale[n]["rps_min"] for n in redis_names]
    hi = [scale[n]["rps_max"] - scale[n]["rps"] for n in redis_names]
    ax.errorbar(ns, rps, yerr=[lo, hi], marker="o", capsize=4, label="Redis store, --processes N")
    if rps:
        ax.plot(ns, [rps[0] * n for n in ns], ":", color="grey", label="linear from N = 1")
    refs = (
        (memory, "--", "C1"),
        ("local interval", (0, (1, 3)), "C3"),
        ("local strict", "-.", "C2"),
    )
    for name, style, color in refs:
        if name in scale:
            ax.axhline(scale[name]["rps"], linestyle=style, color=color, label=f"{name}, 1 process")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("server processes (N)")
    ax.set_ylabel("TRAIN calls/s (median round)")
    top = max([*(scale[n]["rps_max"] for n in scale), *(rps[0] * n for n in ns[:1] + ns[-1:])])
    ax.set_ylim(0, top * 1.4)  # room for the legend above the lines
    ax.set_title(title, fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---- the machine


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip() or "unknown"


def filesystem(path: Path) -> str:
    """The filesystem type and device ``path`` is on (strict's fsync cost depends on it)."""
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
                best = (mnt, kind, dev)
    except OSError:
        pass
    return f"{best[1]} on {best[2]}"


def script_committed() -> bool:
    """Whether this script is committed unchanged (git_commit's '+dirty' ignores new files)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", str(Path(__file__).resolve())],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return not out.strip()


# ---- the report


def report(data: dict[str, Any], plot_rel: str | None) -> str:
    m, meta = data["machine"], data["meta"]
    single, scale = data["single"], data["scale"]
    mem_gib = (m.get("memory_bytes") or 0) / 2**30
    fsyncs = meta["appendfsync"]
    headline = f"redis ({fsyncs[0]})"
    lines = [
        "## Session stores and `--processes` (`benchmarks/stores.py`)",
        "",
        f"Written by `{meta['command']}` on {meta['date']}, in {meta['runtime_s']:.0f} s, on "
        f"commit {meta['commit']}"
        + ("" if meta.get("script_committed", True) else " (this script not yet committed)")
        + f". Each figure is the median of {meta['rounds']} round(s); in "
        "every round the servers take turns (the order rotating), so a change of load on the "
        "machine hits all of them alike.",
        "",
    ]
    if meta["quick"]:
        lines += ["**This is a `--quick` smoke run: its numbers are not measurements.**", ""]
    lines += [
        *_table(
            ["CPU", "cores", "RAM", "python", "torch", "grpcio", "redis-server", "state dir on"],
            [
                [
                    str(m.get("cpu_model")),
                    str(m.get("cpu_count")),
                    f"{mem_gib:.1f} GiB",
                    str(m.get("python")),
                    str(m.get("torch")),
                    str(m.get("grpcio")),
                    meta["redis_version"],
                    meta["state_fs"],
                ]
            ],
        ),
        "",
        "Load average (1 min) at start / end: "
        f"{meta['load_start']:.2f} / {meta['load_end']:.2f} (the end figure counts this run's "
        "own load). The client, the servers and redis-server share the machine's cores.",
        "",
        "- Every call is a unary `Normalize` of one [64, 256] float32 batch (64 KiB) in TRAIN "
        "mode, carrying a fresh idempotency key as the Python client's calls do (the stores "
        "remember each key), sent by `normserve bench`'s load generator (asyncio, closed loop).",
        "- Servers: `python -m normserve.server --device cpu` with the default settings and "
        "`--store memory` (the default), `--state-dir DIR --durability interval` (a snapshot "
        "every 5 s), `--state-dir DIR --durability strict` (a TRAIN is answered once its log "
        "record is fsynced; concurrent updates share an fsync), or `--store "
        "redis://127.0.0.1:PORT/DB`.",
        "- redis-server: `--appendonly yes --save ''`, with "
        + " and ".join(f"`--appendfsync {f}`" for f in fsyncs)
        + f" (one server each). `{fsyncs[0]}` is the headline Redis figure"
        + (
            "; `always` fsyncs every write before answering, which is what strict means for "
            "the local store."
            if "always" in fsyncs[1:]
            else "."
        ),
        f"- {meta['duration_single']:g} s measured after {meta['warmup']:g} s of warm-up "
        f"(one session per store); {meta['duration_scale']:g} s after {meta['warmup']:g} s "
        "for the 64-session runs.",
        "- *CPU per call*: the normserve processes' CPU seconds over the measured window (from "
        "/proc) divided by the calls answered: what a call costs the server besides waiting "
        "(for an fsync, for Redis). *other load*: the cores the rest of the machine kept busy "
        "meanwhile (all busy CPU in /proc/stat less this benchmark's client, servers and "
        "redis-server); well above 0 means other work shared the cores and the row's latencies "
        "and rates are low by that much.",
        "",
        "### One session: what each store costs",
        "",
        *_table(*single_table(single)),
        "",
    ]
    sm = data["ratios"]
    lines += [
        f"- **strict costs** {_pct(sm['strict_vs_interval_p50_c1'])} of p50 at concurrency 1 "
        f"over interval ({_pct(sm['strict_vs_memory_p50_c1'])} over memory), and its "
        f"throughput at concurrency 16 on one session is {_x(sm['strict_vs_interval_rps_c16'])} "
        f"interval's ({_x(sm['strict_vs_memory_rps_c16'])} memory's). At concurrency 1, req/s "
        f"is {_x(sm['strict_vs_interval_rps_c1'])} interval's.",
        f"- **Redis ({fsyncs[0]}) p50 overhead at concurrency 1** over the memory store: "
        f"{_pct(sm['redis_vs_memory_p50_c1'])} (per round: "
        + ", ".join(_pct(v) for v in sm["redis_vs_memory_p50_c1_rounds"])
        + f"). Target at most +{REDIS_TARGET:.0%}: **{sm['redis_target']}**.",
    ]
    for f in fsyncs[1:]:
        key = f"redis ({f})"
        if key in single:
            lines.append(
                f"- Redis with `appendfsync {f}`: p50 at concurrency 1 "
                f"{_pct(ratio(single[key]['c1']['p50_us'], single['memory']['c1']['p50_us']))} "
                "over memory."
            )
    lines += [
        "",
        f"### {SCALE_SESSIONS} sessions at concurrency {SCALE_CONCURRENCY}: throughput "
        "against processes",
        "",
        f"Caller k of {SCALE_CONCURRENCY} sends TRAIN calls to session k only (pre-created), over "
        f"channel k mod {meta['channels_per_n']}; {meta['client_processes']} client "
        f"process{'es' if meta['client_processes'] > 1 else ''}. Each channel is its own "
        "TCP connection, and with N > 1 the kernel spreads connections, not calls, over the "
        "processes; *per process* shows how evenly (CPU cores used by the least and most busy "
        "one). *cores* are CPU seconds per second of the measured window: the client's, all "
        "normserve processes' together, and redis-server's.",
        "",
        *_table(*scale_table(scale, headline, "memory")),
        "",
    ]
    if plot_rel:
        lines += [
            f"![TRAIN calls/s against --processes on the Redis store]({plot_rel})",
            "",
        ]
    cpu = data.get("client_us_per_call")
    lines += ["### Notes", ""]
    if cpu:
        lines.append(
            f"- **The client's own cost**: the load generator spent {cpu:.0f} us of CPU per call "
            f"(median over the 64-session runs), so one client process, whose asyncio loop runs "
            f"on one core, tops out near {1e6 / cpu:,.0f} calls/s, less in practice as gRPC's "
            "own threads share that budget. Use `--client-processes` on a larger machine."
        )
    cores = m.get("cpu_count") or 0
    if cores and cores < 8:
        lines.append(
            f"- **This machine has {cores} cores**, shared by the client, every normserve "
            "process and redis-server: the processes curve here shows the cost of the shared "
            "store and of running more processes than there are free cores, not how normserve "
            "scales. The target (8 processes at least 5x one) can only be judged on the 16-core "
            "machine."
        )
    lines += [
        "- The local store's fsync cost depends on the disk under the state directory "
        f"({meta['state_fs']} here; `--state-root` picks another).",
        "- On the 16-core GPU machine, where Debian's redis-server travels as files (`apt-get "
        "download redis-server redis-tools libjemalloc2 liblzf1` here, `dpkg -x` each into one "
        "folder there):",
        "",
        "```bash",
        "R=/tmp/redis-root  # dpkg -x redis-server_*.deb $R, and likewise the others",
        "LD_LIBRARY_PATH=$R/usr/lib/x86_64-linux-gnu NORMSERVE_REDIS_SERVER=$R/usr/bin/redis-server \\",
        "  python benchmarks/stores.py --processes-list 1,2,4,8 --client-processes 4 \\",
        "  --json stores.json --out docs/benchmarks.md",
        "```",
        "",
        "  (with normserve installed there and the wheels it needs that the machine lacks: "
        "redis, hdrhistogram, matplotlib). The client runs in 4 processes so that it is not "
        "the limit; `--callers-per-channel 1` opens one connection per caller if the table "
        "shows processes left idle.",
        "",
        "Rerun here: `python benchmarks/stores.py --out docs/benchmarks.md --json stores.json` "
        "(about 3 minutes); `--quick` is a ~30 s smoke run; `--help` lists the options.",
    ]
    return "\n".join(lines)


def place_report(out: Path, text: str) -> str:
    """``out`` with this script's section replaced (or added before the glossary, or at the
    end), the rest of the file kept."""
    old = out.read_text() if out.exists() else ""
    block = f"{REPORT_BEGIN}\n{text.strip()}\n{REPORT_END}"
    if REPORT_BEGIN in old and REPORT_END in old:
        head, _, rest = old.partition(REPORT_BEGIN)
        _, _, tail = rest.partition(REPORT_END)
        return f"{head}{block}{tail}"
    anchor = "\n---\n\n## Glossary"
    if anchor in old:
        head, _, tail = old.partition(anchor)
        return f"{head.rstrip()}\n\n{block}\n{anchor}{tail}"
    return f"{old.rstrip()}\n\n{block}\n" if old else block + "\n"


# ---- the run


def parse_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("a comma-separated list of positive integers")
    return values


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    warmup = args.warmup if args.warmup is not None else (0.2 if quick else 0.5)
    d_single = args.duration or (0.5 if quick else 2.0)
    d_scale = args.scale_duration or (1.0 if quick else 3.0)
    fsyncs = [f for f in args.appendfsync.split(",") if f]
    client_procs = args.client_processes or max(1, min(4, (os.cpu_count() or 1) // 4))
    binary = redis_binary(args.redis_server)
    os.environ["NORMSERVE_REDIS_SERVER"] = binary  # for tests/_redis.py's RedisServer
    state_root = Path(args.state_root) if args.state_root else work
    state_root.mkdir(parents=True, exist_ok=True)
    redis_servers: dict[str, Any] = {}
    servers: dict[Config, Server] = {}
    bench: Bench | None = None
    db = itertools.count()
    try:
        for f in fsyncs:
            redis_servers[f] = start_redis(work / f"redis-{f}", f)
            log(f"redis-server (appendfsync {f}) on {redis_servers[f].url}")
        urls = {f: r.url for f, r in redis_servers.items()}
        bench = Bench()

        # (A) one session each, c1 and c16
        single_cfgs = [Config("memory"), Config("interval"), Config("strict")]
        single_cfgs += [Config("redis", fsync=f) for f in fsyncs]
        servers = start_servers(single_cfgs, state_root, urls, db)
        sids = {c: asyncio.run(create_sessions(s.address, 1)) for c, s in servers.items()}
        log(f"(A) one session, concurrency {SINGLE_CONCURRENCY}, {rounds} rounds")
        for rnd in range(rounds):
            for cfg in rotate(single_cfgs, rnd):
                for conc in SINGLE_CONCURRENCY:
                    bench.redis_urls = [urls[cfg.fsync]] if cfg.store == "redis" else []
                    bench.measure(servers[cfg], sids[cfg], conc, 1, d_single, warmup, rnd)
        for s in servers.values():
            s.stop()
        servers = {}

        # (B) 64 sessions at c64, against processes
        head = fsyncs[0]
        scale_cfgs = [Config("memory")]
        scale_cfgs += [Config(s) for s in ("interval", "strict") if s in args.scale_references]
        scale_cfgs += [Config("redis", n, head) for n in args.processes_list]
        servers = start_servers(scale_cfgs, state_root, urls, db)
        sids = {
            c: asyncio.run(create_sessions(s.address, SCALE_SESSIONS)) for c, s in servers.items()
        }
        bench.redis_urls = [urls[head]]
        bench.start_clients(client_procs)
        log(
            f"(B) {SCALE_SESSIONS} sessions, concurrency {SCALE_CONCURRENCY}, {rounds} rounds, "
            f"{client_procs} client process(es)"
        )
        channels: dict[int, int] = {}
        for rnd in range(rounds):
            for cfg in rotate(scale_cfgs, rnd):
                n = cfg.processes
                channels[n] = max(math.ceil(SCALE_CONCURRENCY / args.callers_per_channel), 2 * n)
                bench.measure(
                    servers[cfg], sids[cfg], SCALE_CONCURRENCY, channels[n], d_scale, warmup, rnd,
                    clients=client_procs,
                )  # fmt: skip
    finally:
        if bench is not None:
            bench.close()
        for s in servers.values():
            s.stop()
        for r in redis_servers.values():
            r.stop()

    single = {
        c.name: {f"c{k}": median_of(bench.rounds, c.name, k) for k in SINGLE_CONCURRENCY}
        for c in single_cfgs
    }
    scale = {}
    for c in scale_cfgs:
        f = median_of(bench.rounds, c.name, SCALE_CONCURRENCY)
        assert f is not None
        scale[c.name] = {**f, "processes": c.processes, "store": c.store}
    hname = f"redis ({head})"

    def p(a: str, b: str, conc: int, key: str) -> float | None:
        fa, fb = single[a][f"c{conc}"], single[b][f"c{conc}"]
        k = "rps" if key == "rps" else f"{key}_us"
        return ratio(fa[k], fb[k]) if fa and fb else None

    redis_p50 = p(hname, "memory", 1, "p50")
    ratios = {
        "strict_vs_interval_p50_c1": p("local strict", "local interval", 1, "p50"),
        "strict_vs_memory_p50_c1": p("local strict", "memory", 1, "p50"),
        "strict_vs_interval_rps_c1": p("local strict", "local interval", 1, "rps"),
        "strict_vs_memory_rps_c1": p("local strict", "memory", 1, "rps"),
        "strict_vs_interval_rps_c16": p("local strict", "local interval", 16, "rps"),
        "strict_vs_memory_rps_c16": p("local strict", "memory", 16, "rps"),
        "interval_vs_memory_p50_c1": p("local interval", "memory", 1, "p50"),
        "redis_vs_memory_p50_c1": redis_p50,
        "redis_vs_memory_p50_c1_rounds": paired(bench.rounds, hname, "memory", 1, "p50"),
        "redis_vs_memory_rps_c16": p(hname, "memory", 16, "rps"),
        "redis_target": "n/a"
        if redis_p50 is None
        else ("PASS" if redis_p50 <= 1 + REDIS_TARGET else "MISS"),
    }
    per_call = [
        r.client_cores / r.rps * 1e6
        for r in bench.rounds
        if r.concurrency == SCALE_CONCURRENCY and r.client_cores and r.rps
    ]
    return {
        "single": single,
        "scale": scale,
        "ratios": ratios,
        "client_us_per_call": statistics.median(per_call) if per_call else None,
        "rounds": [{**asdict(r), "other_cores": r.other_cores} for r in bench.rounds],
        "meta": {
            "quick": quick,
            "rounds": rounds,
            "warmup": warmup,
            "duration_single": d_single,
            "duration_scale": d_scale,
            "appendfsync": fsyncs,
            "client_processes": client_procs,
            "channels_per_n": ", ".join(f"{v} for N = {k}" for k, v in sorted(channels.items())),
            "processes_list": args.processes_list,
            "redis_binary": binary,
            "redis_version": _version([binary, "--version"]),
            "state_fs": filesystem(state_root),
        },
    }


def summary_text(data: dict[str, Any]) -> str:
    s, sc, r = data["single"], data["scale"], data["ratios"]
    head = data["meta"]["appendfsync"][0]
    return "\n".join(
        [
            "(A) one session, [64, 256] float32 unary TRAIN, medians of rounds",
            _text_table(*single_table(s)),
            "",
            f"strict vs interval: c1 p50 {_pct(r['strict_vs_interval_p50_c1'])}, c1 req/s "
            f"{_x(r['strict_vs_interval_rps_c1'])}, c16 req/s {_x(r['strict_vs_interval_rps_c16'])}",
            f"strict vs memory:   c1 p50 {_pct(r['strict_vs_memory_p50_c1'])}, c1 req/s "
            f"{_x(r['strict_vs_memory_rps_c1'])}, c16 req/s {_x(r['strict_vs_memory_rps_c16'])}",
            f"redis ({head}) vs memory: c1 p50 {_pct(r['redis_vs_memory_p50_c1'])} "
            f"(target <= +{REDIS_TARGET:.0%}: {r['redis_target']})",
            "",
            f"(B) {SCALE_SESSIONS} sessions at concurrency {SCALE_CONCURRENCY}",
            _text_table(*scale_table(sc, f"redis ({head})", "memory")),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~30 s smoke run; numbers meaningless")
    p.add_argument("--out", help="markdown file whose stores.py section to write (or add)")
    p.add_argument("--plot", help="throughput plot (default with --out: img/ beside it)")
    p.add_argument("--json", help="also write every figure and round here")
    p.add_argument(
        "--processes-list", type=parse_list, default=[1, 2], help="N of --processes (1,2)"
    )
    p.add_argument(
        "--client-processes",
        type=int,
        default=0,
        help="client processes for the 64-session runs (default: cores / 4, 1 to 4)",
    )
    p.add_argument(
        "--callers-per-channel",
        type=int,
        default=2,
        help="callers sharing one channel (a TCP connection) in the 64-session runs; at least "
        "2 channels per server process are opened whatever this says (2)",
    )
    p.add_argument("--rounds", type=int, help="rounds of every measurement (3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per one-session run (2; quick 0.5)")
    p.add_argument("--scale-duration", type=float, help="seconds per 64-session run (3; quick 1)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per run (0.5; quick 0.2)")
    p.add_argument(
        "--appendfsync",
        default="everysec,always",
        help="redis-server appendfsync policies, one server each; the first is the headline "
        "and serves the processes runs (everysec,always)",
    )
    p.add_argument(
        "--scale-references",
        default="interval,strict",
        help="local stores also run (one process) in the 64-session runs (interval,strict)",
    )
    p.add_argument("--redis-server", help="redis-server binary (default: $NORMSERVE_REDIS_SERVER)")
    p.add_argument("--state-root", help="where the local stores' directories go (a temp dir)")
    args = p.parse_args(argv)
    if any(n > 1 for n in args.processes_list) and not args.appendfsync:
        p.error("--processes needs the Redis store: give --appendfsync")
    started = time.monotonic()
    load_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="normserve-stores-"))
    try:
        data = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cmd = "python benchmarks/stores.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    data["machine"] = machine_info()
    data["meta"].update(
        command=cmd,
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        runtime_s=time.monotonic() - started,
        load_start=load_start,
        load_end=os.getloadavg()[0],
        commit=git_commit(ROOT),
        script_committed=script_committed(),
    )
    print(summary_text(data))
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is None and args.out:
        plot_path = Path(args.out).parent / "img" / "stores_processes.png"
    plot_rel = None
    if plot_path is not None:
        head = f"redis ({data['meta']['appendfsync'][0]})"
        names = [n for n, f in data["scale"].items() if f["store"] == "redis"]
        m = data["machine"]
        plot(
            plot_path,
            data["scale"],
            names,
            "memory",
            f"[64, 256] float32 unary TRAIN, {SCALE_SESSIONS} sessions, concurrency "
            f"{SCALE_CONCURRENCY}, store {head}\n{m.get('cpu_count')} cores "
            f"({m.get('cpu_model')}) shared with the client and Redis; commit "
            f"{data['meta']['commit']}; bars: min-max of {data['meta']['rounds']} rounds",
        )
        print(f"wrote {plot_path}")
        if args.out:
            plot_rel = os.path.relpath(plot_path.resolve(), Path(args.out).resolve().parent)
    if args.out:
        out = Path(args.out)
        out.write_text(place_report(out, report(data, plot_rel)))
        print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    print(f"in {data['meta']['runtime_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
