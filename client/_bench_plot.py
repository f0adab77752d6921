"""``normserve bench --plot``: the latency percentile curve and latency over time (matplotlib)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from normserve.client._bench_report import Result

__all__ = ["plot_result", "require_matplotlib"]

_TICKS = (50.0, 90.0, 99.0, 99.9, 99.99, 99.999)


def require_matplotlib() -> Any:
    """matplotlib.pyplot on a file-only backend, or a clear error naming the extra to install."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "normserve: --plot needs matplotlib, which is not installed: "
            "pip install 'normserve[plot]'"
        ) from None
    matplotlib.use("Agg")  # no display needed; only files are written
    import matplotlib.pyplot as plt

    return plt


def _x(percentile: float) -> float:
    """Percentile -> 1/(1-p): 50% -> 2, 99% -> 100, 99.9% -> 1000."""
    return 1.0 / (1.0 - percentile / 100.0)


def percentile_curve(result: Result) -> tuple[list[float], list[float]]:
    """(1/(1-p), latency ms) points of the histogram, the last point at 1 - 1/count."""
    h = result.histogram
    n = int(h.get_total_count())
    if not n:
        return [], []
    xs, ys = [], []
    cap = _x(100.0 * (1.0 - 1.0 / max(n, 2)))
    for item in h.get_percentile_iterator(5):
        p = item.percentile_level_iterated_to
        x = cap if p >= 100.0 else min(_x(p), cap)
        xs.append(x)
        ys.append(item.value_iterated_to / 1e3)
    return xs, ys


def plot_result(result: Result | Sequence[Result], path: str, labels: Sequence[str] = ()) -> None:
    """Writes a PNG: (1) latency by percentile on a 1/(1-p) log scale, (2) p50/p99 per second."""
    plt = require_matplotlib()
    results = [result] if isinstance(result, Result) else list(result)
    names = list(labels) or [_label(r) for r in results]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 8), constrained_layout=True)
    top = 1.0
    for r, name in zip(results, names, strict=True):
        xs, ys = percentile_curve(r)
        if xs:
            ax1.plot(xs, ys, label=name)
            top = max(top, xs[-1])
    ax1.set_xscale("log")
    ticks = [p for p in _TICKS if _x(p) <= top * 1.01] or [50.0]
    ax1.set_xticks([_x(p) for p in ticks])
    ax1.set_xticklabels([f"{p:g}%" for p in ticks])
    ax1.minorticks_off()
    ax1.set_xlim(1.0, max(top, _x(ticks[-1])))
    ax1.set_xlabel("percentile")
    ax1.set_ylabel("latency (ms)")
    ax1.set_title("Latency by percentile")
    ax1.grid(True, which="major", alpha=0.3)
    ax1.legend(loc="upper left")

    for r, name in zip(results, names, strict=True):
        pts = [s for s in r.series if s.get("count")]
        t = [s["t"] + 0.5 for s in pts]
        (line,) = ax2.plot(t, [s["p50_us"] / 1e3 for s in pts], label=f"{name} p50")
        ax2.plot(
            t,
            [s["p99_us"] / 1e3 for s in pts],
            linestyle="--",
            color=line.get_color(),
            label=f"{name} p99",
        )
    ax2.set_xlabel("seconds since the end of warm-up")
    ax2.set_ylabel("latency (ms)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Latency over time (per second)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(loc="upper left")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(r: Result) -> str:
    cfg = r.config
    parts = [str(cfg.get("rpc", "")), "x".join(map(str, cfg.get("shape", [])))]
    parts.append(f"rate {cfg['rate']:g}/s" if cfg.get("rate") else f"c{cfg.get('concurrency', 1)}")
    label = " ".join(p for p in parts if p)
    return label or f"{math.floor(r.throughput_rps)} req/s"
