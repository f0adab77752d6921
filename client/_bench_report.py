"""What ``normserve bench`` measured: the result type, its JSON form, the text summary and compare.

A result keeps its whole latency distribution as an HDR histogram (microseconds, 1 us..60 s, 3
significant digits); the JSON form stores it with ``encode()`` so results can be merged and
re-analyzed later (``HdrHistogram.decode`` then ``add``).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

__all__ = [
    "PERCENTILES",
    "Result",
    "compare_table",
    "fmt_us",
    "format_summary",
    "git_commit",
    "load_result",
    "machine_info",
    "new_histogram",
]

#: Latencies are recorded in microseconds, from 1 us to 60 s, with 3 significant digits.
LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS = 1, 60_000_000, 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
FORMAT_VERSION = 1


def new_histogram() -> HdrHistogram:
    """An empty latency histogram: microseconds, 1 us to 60 s, 3 significant digits."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)


def _pct_key(p: float) -> str:
    return f"p{p:g}"


@dataclass
class Result:
    """One load run. ``count`` is the successful requests measured (after warm-up); latencies of
    successes only are in ``histogram``; ``errors`` counts failures by gRPC status code name."""

    histogram: HdrHistogram
    elapsed_s: float
    errors: dict[str, int] = field(default_factory=dict)
    bytes_per_request: int = 0
    series: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    #: the first message seen for each error code (what the server said)
    error_messages: dict[str, str] = field(default_factory=dict)
    #: open loop: the rate asked for (None: closed loop), the measured requests sent, and those
    #: that fell due in the measured window but were never sent (the run fell behind)
    target_rate: float | None = None
    sent: int = 0
    missed: int = 0

    @property
    def sent_rps(self) -> float:
        """Requests sent per second of the measured window (what an open loop achieved)."""
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def rate_reached(self) -> bool:
        """Open loop: whether the requests went out at (within 5% of) the target rate."""
        if self.target_rate is None:
            return True
        return self.missed <= 0.05 * (self.sent + self.missed) and self.sent_rps >= (
            0.95 * self.target_rate
        )

    @property
    def count(self) -> int:
        """Successful requests measured."""
        return int(self.histogram.get_total_count())

    @property
    def error_count(self) -> int:
        """Failed requests measured, all codes together."""
        return sum(self.errors.values())

    @property
    def throughput_rps(self) -> float:
        """Successful requests per second of the measured window."""
        return self.count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def throughput_mbps(self) -> float:
        """Megabytes (1e6) of input tensor per second."""
        return self.throughput_rps * self.bytes_per_request / 1e6

    def latency_us(self) -> dict[str, float]:
        """p50..p99.9, max, min and mean in microseconds (zeros when nothing succeeded)."""
        h = self.histogram
        if not h.get_total_count():
            return {**{_pct_key(p): 0.0 for p in PERCENTILES}, "max": 0.0, "min": 0.0, "mean": 0.0}
        out = {_pct_key(p): float(h.get_value_at_percentile(p)) for p in PERCENTILES}
        out.update(
            max=float(h.get_max_value()),
            min=float(h.get_min_value()),
            mean=float(h.get_mean_value()),
        )
        return out

    def summary(self) -> dict[str, Any]:
        """Counts, errors, throughput and latency percentiles, as JSON-ready values."""
        return {
            "count": self.count,
            "errors": dict(self.errors),
            "error_messages": dict(self.error_messages),
            "elapsed_s": round(self.elapsed_s, 6),
            "throughput_rps": round(self.throughput_rps, 3),
            "throughput_mbps": round(self.throughput_mbps, 3),
            "bytes_per_request": self.bytes_per_request,
            "latency_us": self.latency_us(),
            "target_rate_rps": self.target_rate,
            "sent": self.sent,
            "sent_rps": round(self.sent_rps, 3),
            "missed": self.missed,
            "rate_reached": self.rate_reached,
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: config, machine, summary, per-second series and the encoded histogram."""
        return {
            "format": "normserve-bench",
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "machine": self.machine,
            "summary": self.summary(),
            "series": self.series,
            "histogram": self.histogram.encode().decode("ascii"),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Result:
        """The inverse of ``to_dict``; ValueError if ``d`` is not a normserve bench result."""
        if d.get("format") != "normserve-bench":
            raise ValueError("not a normserve bench result (no 'format': 'normserve-bench')")
        s = d["summary"]
        return cls(
            histogram=HdrHistogram.decode(d["histogram"].encode("ascii")),
            elapsed_s=float(s["elapsed_s"]),
            errors={k: int(v) for k, v in s.get("errors", {}).items()},
            error_messages=dict(s.get("error_messages", {})),
            bytes_per_request=int(s.get("bytes_per_request", 0)),
            series=list(d.get("series", [])),
            config=dict(d.get("config", {})),
            machine=dict(d.get("machine", {})),
            target_rate=s.get("target_rate_rps"),
            sent=int(s.get("sent", 0)),
            missed=int(s.get("missed", 0)),
        )

    def write_json(self, path: str) -> None:
        """Writes the result to ``path`` ('-': stdout)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path == "-":
            print(text, end="", flush=True)
        else:
            Path(path).write_text(text)


def load_result(path: str) -> Result:
    """Reads a result written by ``Result.write_json``; ValueError if it is not one."""
    try:
        return Result.from_dict(json.loads(Path(path).read_text()))
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a normserve bench result ({err})") from None


# ---- the machine and versions, so a number can be traced to where it came from


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def git_commit(cwd: str | Path | None = None) -> str:
    """The checkout's commit (with '+dirty' when it has changes), or 'unknown'."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
    """This machine and the versions in use (CPU, memory, Python, torch, grpcio, protobuf,
    normserve, git commit, load average): stored with every result."""
    import google.protobuf
    import grpc
    import torch

    from normserve import __version__

    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "normserve": __version__,
        "git_commit": git_commit(),
        "loadavg": load,
    }


# ---- text


def fmt_us(us: float) -> str:
    """Microseconds for people: ``850us``, ``1.25ms``, ``2.00s``."""
    if us >= 1e6:
        return f"{us / 1e6:.2f}s"
    if us >= 1e3:
        return f"{us / 1e3:.2f}ms"
    return f"{us:.0f}us"


def format_summary(r: Result) -> str:
    """A few lines a person reads after a run."""
    lat = r.latency_us()
    cfg = r.config
    what = " ".join(
        f"{k}={cfg[k]}"
        for k in ("rpc", "shape", "dtype", "mode", "concurrency", "rate")
        if cfg.get(k) is not None
    )
    lines = [
        f"bench   {what}".rstrip(),
        f"count   {r.count} ok, {r.error_count} errors in {r.elapsed_s:.2f}s",
        f"rate    {r.throughput_rps:,.1f} req/s, {r.throughput_mbps:,.1f} MB/s of input tensors",
    ]
    if r.count:
        lines.append(
            "latency "
            + "  ".join(f"{_pct_key(p)} {fmt_us(lat[_pct_key(p)])}" for p in PERCENTILES)
            + f"  max {fmt_us(lat['max'])}  mean {fmt_us(lat['mean'])}"
        )
    else:
        lines.append("latency none: no request succeeded")
    for code, n in sorted(r.errors.items()):
        said = r.error_messages.get(code)
        lines.append(f"errors  {code} {n}" + (f" (first: {said})" if said else ""))
    if r.target_rate is not None:
        lines.append(
            f"target  {r.target_rate:,.1f} req/s; sent {r.sent_rps:,.1f} req/s"
            + (f", {r.missed} due requests never sent" if r.missed else "")
        )
        if not r.rate_reached:
            lines.append(
                f"WARNING the target rate was not reached ({r.sent_rps / r.target_rate:.0%} of it): "
                "the server, or this client, could not keep up with "
                f"{r.config.get('concurrency', '?')} requests in flight; latencies count from when "
                "each request was due, so they include the queueing"
            )
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a else "n/a"


def compare_table(a: Result, b: Result, names: tuple[str, str] = ("a", "b")) -> str:
    """Two results side by side, with b/a for throughput and each percentile."""
    la, lb = a.latency_us(), b.latency_us()
    rows: list[tuple[str, str, str, str]] = [
        ("count", str(a.count), str(b.count), _ratio(a.count, b.count)),
        ("errors", str(a.error_count), str(b.error_count), ""),
        (
            "req/s",
            f"{a.throughput_rps:,.1f}",
            f"{b.throughput_rps:,.1f}",
            _ratio(a.throughput_rps, b.throughput_rps),
        ),
        (
            "MB/s",
            f"{a.throughput_mbps:,.1f}",
            f"{b.throughput_mbps:,.1f}",
            _ratio(a.throughput_mbps, b.throughput_mbps),
        ),
    ]
    for key in [*(_pct_key(p) for p in PERCENTILES), "max", "mean"]:
        rows.append((key, fmt_us(la[key]), fmt_us(lb[key]), _ratio(la[key], lb[key])))
    wa = max(len(names[0]), *(len(r[1]) for r in rows))
    wb = max(len(names[1]), *(len(r[2]) for r in rows))
    out = [f"{'':<8} {names[0]:>{wa}} {names[1]:>{wb}} {'b/a':>7}"]
    out += [f"{k:<8} {x:>{wa}} {y:>{wb}} {z:>7}" for k, x, y, z in rows]
    for side, r in (("a", a), ("b", b)):
        cfg = r.config
        desc = ", ".join(
            f"{k}={cfg[k]}"
            for k in ("rpc", "shape", "dtype", "mode", "concurrency", "rate")
            if cfg.get(k) is not None
        )
        out.append(f"{side}: {desc}")
    return "\n".join(out)
