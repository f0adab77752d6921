"""What a round trip to normserve costs against a local ``torch.nn.BatchNorm2d``, by batch size.

    python benchmarks/vs_local.py [--sizes 1,2,4,8,16,32,64,128] [--flat-sizes 2,8,...]
                                  [--seconds 1.5] [--json out.json] [--plot out.png]
                                  [--torch-threads 1] [--chunk-bytes 1048576]
                                  [--concurrency 1,2,4,8,16] [--bench-seconds 4]
                                  [--bench-plot-concurrency 4 --bench-plot out.png]
                                  [--server-arg=--workers=16]...

Starts ``python -m normserve.server`` (what ``normserve serve`` runs) as a subprocess on a free
loopback port, so client and server are separate processes as in production, and for each batch
shape measures the median (p50) time of one call of:

  local TRAIN   torch.nn.BatchNorm2d (BatchNorm1d for [N, C]) forward in train mode, in this
                process, under torch.no_grad(), with as many torch threads as the server uses
                (--torch-threads, default 1 like ``normserve serve``);
  local EVAL    the same module in eval mode;
  remote TRAIN  the blocking ``Client.normalize`` on one session, mode train: encoding, the gRPC
                round trip, the server's work and decoding the answer into a tensor;
  remote EVAL   the same, mode eval.

Shapes are [N, 64, 28, 28] for each N of --sizes and [N, 256] for each N of --flat-sizes, float32.
Batches that do not fit one message of the client's chunk size (1 MiB by default, less a few KiB
of headroom; --chunk-bytes changes it) are streamed in chunks by the client, as for any caller.
The four kinds are measured in turns of ~0.1 s each until --seconds per shape have passed, so a
change of load on the machine hits all of them alike. It prints a table and, with --json, writes
every figure with the machine and versions.

Then (unless --concurrency '') it runs ``normserve bench`` (the CLI, as a subprocess) against the
same server at each concurrency of --concurrency: closed loop, [64, 256] float32 unary, TRAIN and
EVAL, --bench-seconds each after 1 s of warm-up, and tabulates req/s, p50 and p99; with
--bench-plot, the run at --bench-plot-concurrency is also drawn by ``normserve bench --plot``.

"Overhead" is remote p50 minus local p50 (same mode); "ratio" is remote p50 / local p50. The
break-even size reported is the smallest N from which, for that N and every larger one measured,
remote TRAIN costs at most --ratio-threshold (2.0) times local TRAIN: the service's overhead is
then no larger than the computing itself. A least-squares line through the [N, 64, 28, 28] rows,
p50 = fixed + per_mib x MiB, separates the per-call cost from the per-byte cost, local and remote.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from run import Proc  # benchmarks/run.py, beside this script

from normserve.client import Client
from normserve.client._tensors import fits_unary
from normserve.client.bench import fmt_us, git_commit, machine_info

ROOT = Path(__file__).resolve().parents[1]
CHANNELS_4D = 64
SPATIAL = (28, 28)
CHANNELS_2D = 256
KINDS = ("local_train", "local_eval", "remote_train", "remote_eval")


def parse_sizes(text: str) -> list[int]:
    sizes = [int(v) for v in text.split(",") if v.strip()]
    if any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return sizes


# ---- the server, as a subprocess


def start_server(extra_args: list[str]) -> Proc:
    """``python -m normserve.server`` on port 0 in its own process (run.py's ``Proc``: the bound
    address is read from its log, which is then drained in the background)."""
    cmd = [
        sys.executable, "-m", "normserve.server", "--address", "127.0.0.1:0",
        "--device", "cpu", "--metrics-address", "off", "--grace-seconds", "1", *extra_args,
    ]  # fmt: skip
    return Proc(cmd, "stderr")


# ---- timing


def time_calls(fn: Callable[[], Any], seconds: float, out: list[float]) -> None:
    """Calls ``fn`` one at a time for about ``seconds`` (at least once); appends each call's time."""
    end = time.perf_counter() + seconds
    while True:
        t = time.perf_counter()
        fn()
        now = time.perf_counter()
        out.append(now - t)
        if now >= end:
            return


def measure_shape(
    client: Client, shape: tuple[int, ...], seconds: float, turn: float
) -> dict[str, Any]:
    """p50 (and p90) of the four kinds for one shape, measured in interleaved turns."""
    x = torch.randn(shape)
    channels = shape[1]
    bn: torch.nn.Module = (
        torch.nn.BatchNorm1d(channels) if len(shape) == 2 else torch.nn.BatchNorm2d(channels)
    )
    session = client.create_session(channels, momentum=0.1)
    sid = session.session_id
    can_train = x.numel() // channels > 1  # one value per channel: torch and normserve refuse it
    try:

        def local_train() -> Any:
            bn.train()
            with torch.no_grad():
                return bn(x)

        def local_eval() -> Any:
            bn.eval()
            with torch.no_grad():
                return bn(x)

        def remote_train() -> Any:
            return client.normalize(sid, x, mode="train").output

        def remote_eval() -> Any:
            return client.normalize(sid, x, mode="eval").output

        fns: dict[str, Callable[[], Any]] = {
            "local_train": local_train,
            "local_eval": local_eval,
            "remote_train": remote_train,
            "remote_eval": remote_eval,
        }
        if not can_train:
            del fns["local_train"], fns["remote_train"]
        for fn in fns.values():  # warm-up: first calls allocate, connect, fault pages in
            for _ in range(3):
                fn()
        # A sanity check that the comparison is of like with like.
        if can_train:
            torch.testing.assert_close(remote_eval(), local_eval(), rtol=1e-4, atol=1e-4)
        times: dict[str, list[float]] = {k: [] for k in fns}
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for kind, fn in fns.items():
                time_calls(fn, turn, times[kind])
    finally:
        client.delete_session(sid)
    nbytes = x.numel() * x.element_size()
    row: dict[str, Any] = {
        "shape": list(shape),
        "n": shape[0],
        "bytes": nbytes,
        "streamed": not fits_unary(x, client.chunk_bytes),
    }
    for kind in KINDS:
        ts = times.get(kind)
        if ts:
            q = statistics.quantiles(ts, n=10) if len(ts) > 1 else [ts[0]] * 9
            row[kind] = {
                "p50_us": statistics.median(ts) * 1e6,
                "p90_us": q[8] * 1e6,
                "calls": len(ts),
            }
        else:
            row[kind] = None
    for mode in ("train", "eval"):
        loc, rem = row[f"local_{mode}"], row[f"remote_{mode}"]
        if loc and rem:
            row[f"ratio_{mode}"] = rem["p50_us"] / loc["p50_us"]
            row[f"overhead_{mode}_us"] = rem["p50_us"] - loc["p50_us"]
        else:
            row[f"ratio_{mode}"] = None
            row[f"overhead_{mode}_us"] = None
    return row


def break_even(rows: list[dict[str, Any]], threshold: float) -> int | None:
    """Smallest N from which remote TRAIN <= threshold x local TRAIN for it and every larger N."""
    found: int | None = None
    for row in sorted(rows, key=lambda r: r["n"], reverse=True):
        ratio = row["ratio_train"]
        if ratio is None:
            continue
        if ratio > threshold:
            break
        found = row["n"]
    return found


def fit(rows: list[dict[str, Any]], kind: str) -> dict[str, float] | None:
    """Least squares p50_us = fixed_us + per_mib_us * MiB over ``rows`` (None under 2 points)."""
    pts = [(r["bytes"] / 2**20, r[kind]["p50_us"]) for r in rows if r[kind]]
    if len({x for x, _ in pts}) < 2:
        return None
    slope, intercept = statistics.linear_regression([x for x, _ in pts], [y for _, y in pts])
    return {"fixed_us": intercept, "per_mib_us": slope}


# ---- scaling with concurrent clients: `normserve bench` against the same server


BENCH_SHAPE = (64, 256)


def bench(
    target: str, concurrency: int, mode: str, seconds: float, plot_path: str | None
) -> dict[str, Any]:
    """One ``normserve bench`` run (closed loop, unary, [64,256] float32); its JSON summary."""
    cmd = [
        sys.executable, "-m", "normserve", "bench", "--target", target, "--rpc", "unary",
        "--shape", ",".join(map(str, BENCH_SHAPE)), "--mode", mode,
        "--concurrency", str(concurrency), "--duration", f"{seconds:g}", "--warmup", "1",
        "--json", "-", "--quiet",
    ]  # fmt: skip
    if plot_path:
        cmd += ["--plot", os.path.abspath(plot_path)]  # the subprocess runs in the repository root
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, cwd=ROOT)
    if done.returncode not in (0, 1):  # 1: some requests failed, reported in the summary
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    out = json.loads(done.stdout)
    summary = out["summary"]
    lat = summary["latency_us"]
    return {
        "concurrency": concurrency,
        "mode": mode,
        "command": "normserve " + " ".join(cmd[3:]),
        "requests": summary["count"],
        "errors": sum(summary["errors"].values()),
        "throughput_rps": summary["throughput_rps"],
        "p50_us": lat["p50"],
        "p99_us": lat["p99"],
        "plot": plot_path,
    }


def scaling_table(rows: list[dict[str, Any]]) -> str:
    header = ["conc", "TRAIN req/s", "TRAIN p50", "TRAIN p99", "EVAL req/s", "EVAL p50",
              "EVAL p99", "errors"]  # fmt: skip
    by = {(r["concurrency"], r["mode"]): r for r in rows}
    body = []
    for c in sorted({r["concurrency"] for r in rows}):
        t, e = by.get((c, "train")), by.get((c, "eval"))
        cells = [str(c)]
        for r in (t, e):
            cells += (
                [f"{r['throughput_rps']:,.0f}", fmt_us(r["p50_us"]), fmt_us(r["p99_us"])]
                if r
                else ["-", "-", "-"]
            )
        cells.append(str(sum(r["errors"] for r in (t, e) if r)))
        body.append(cells)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


# ---- output


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f}"


def _p50(cell: dict[str, Any] | None) -> str:
    return fmt_us(cell["p50_us"]) if cell else "-"


def _x(v: float | None) -> str:
    return f"{v:.1f}x" if v is not None else "-"


def table(rows: list[dict[str, Any]]) -> str:
    header = [
        "shape", "MiB", "sent as", "local TRAIN", "remote TRAIN", "TRAIN ratio",
        "TRAIN overhead", "local EVAL", "remote EVAL", "EVAL ratio",
    ]  # fmt: skip
    body = []
    for r in rows:
        ot = r["overhead_train_us"]
        body.append(
            [
                "[" + ",".join(map(str, r["shape"])) + "]",
                _mib(r["bytes"]),
                "chunks" if r["streamed"] else "1 message",
                _p50(r["local_train"]),
                _p50(r["remote_train"]),
                _x(r["ratio_train"]),
                fmt_us(ot) if ot is not None else "-",
                _p50(r["local_eval"]),
                _p50(r["remote_eval"]),
                _x(r["ratio_eval"]),
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    from normserve.client._bench_plot import require_matplotlib

    plt = require_matplotlib()
    groups = [
        (f"[N, {CHANNELS_4D}, {SPATIAL[0]}, {SPATIAL[1]}] float32", result["rows_4d"]),
        (f"[N, {CHANNELS_2D}] float32", result["rows_2d"]),
    ]
    groups = [(t, rows) for t, rows in groups if rows]
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.8), squeeze=False)
    styles = {
        "local_train": ("local BatchNorm TRAIN", "-", "o"),
        "remote_train": ("remote TRAIN (Client.normalize)", "-", "s"),
        "remote_eval": ("remote EVAL", "--", "^"),
    }
    for ax, (title, rows) in zip(axes[0], groups, strict=True):
        for kind, (label, ls, marker) in styles.items():
            pts = [(r["n"], r[kind]["p50_us"] / 1e3) for r in rows if r[kind]]
            if pts:
                ax.plot(*zip(*pts, strict=True), ls, marker=marker, label=label)
        chunked = [r["n"] for r in rows if r["streamed"]]
        if chunked:
            ax.axvline(
                min(chunked), color="grey", alpha=0.6, lw=1, ls=":",
                label="from here: streamed in chunks (> 1 message)",
            )  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel("p50 latency per call (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"normserve round trip vs local torch ({m['cpu_count']} cores shared by client and "
        f"server, {result['torch_threads']} torch thread(s), commit {result['commit']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sizes",
        type=lambda t: parse_sizes(t) if t.strip() else [],
        default=[1, 2, 4, 8, 16, 32, 64, 128],
        help=f"N of [N,{CHANNELS_4D},{SPATIAL[0]},{SPATIAL[1]}] (1,2,4,8,16,32,64,128; '' none)",
    )
    p.add_argument(
        "--flat-sizes",
        type=lambda t: parse_sizes(t) if t.strip() else [],
        default=[2, 8, 32, 64, 128, 512, 1024, 4096],
        help=f"N of [N,{CHANNELS_2D}] (2,8,32,64,128,512,1024,4096; '' for none)",
    )
    p.add_argument("--seconds", type=float, default=1.5, help="measuring time per shape (1.5)")
    p.add_argument("--turn", type=float, default=0.1, help="seconds per kind per turn (0.1)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads here and on the server (1, the server's default; 0: torch's default)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra flag for the server (repeatable), e.g. --server-arg=--workers=4",
    )
    p.add_argument(
        "--concurrency",
        type=lambda t: parse_sizes(t) if t.strip() else [],
        default=[1, 2, 4, 8, 16],
        help="normserve bench concurrencies, [64,256] TRAIN and EVAL (1,2,4,8,16; '' for none)",
    )
    p.add_argument("--bench-seconds", type=float, default=4.0, help="per bench run (4)")
    p.add_argument("--bench-plot", help="PNG of one bench run, by normserve bench --plot")
    p.add_argument(
        "--bench-plot-concurrency", type=int, default=4, help="which run --bench-plot draws (4)"
    )
    p.add_argument("--bench-plot-mode", choices=("train", "eval"), default="train", help="(train)")
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=0,
        help="the client's chunk size (0: its default, 1 MiB); batches over it are streamed",
    )
    p.add_argument("--ratio-threshold", type=float, default=2.0, help="break-even ratio (2.0)")
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--plot", help="draw latency against batch size into this PNG")
    args = p.parse_args(argv)
    if args.plot:
        from normserve.client._bench_plot import require_matplotlib

        require_matplotlib()  # fail before the run, not after it
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_start = os.getloadavg()[0]
    started = time.monotonic()
    server = start_server([f"--torch-threads={args.torch_threads}", *args.server_arg])
    rows_4d: list[dict[str, Any]] = []
    rows_2d: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    chunk_bytes = 0
    try:
        target = server.wait_address()
        print(f"normserve on {target}; torch threads {torch.get_num_threads()}", file=sys.stderr)
        chunking = {"chunk_bytes": args.chunk_bytes} if args.chunk_bytes else {}
        with Client(target, timeout=60, **chunking) as client:
            chunk_bytes = client.chunk_bytes
            shapes: list[tuple[tuple[int, ...], list[dict[str, Any]]]]
            shapes = [((n, CHANNELS_4D, *SPATIAL), rows_4d) for n in args.sizes]
            shapes += [((n, CHANNELS_2D), rows_2d) for n in args.flat_sizes]
            for shape, rows in shapes:
                row = measure_shape(client, shape, args.seconds, args.turn)
                rows.append(row)
                print(
                    f"{list(shape)!s:<18} local TRAIN {_p50(row['local_train']):>8}  "
                    f"remote TRAIN {_p50(row['remote_train']):>8}  "
                    f"remote EVAL {_p50(row['remote_eval']):>8}",
                    file=sys.stderr,
                    flush=True,
                )
            for c in args.concurrency:
                for mode in ("train", "eval"):
                    draw = (
                        args.bench_plot
                        if args.bench_plot
                        and c == args.bench_plot_concurrency
                        and mode == args.bench_plot_mode
                        else None
                    )
                    r = bench(target, c, mode, args.bench_seconds, draw)
                    scaling.append(r)
                    print(
                        f"bench c{c} {mode}: {r['throughput_rps']:,.0f} req/s  "
                        f"p50 {fmt_us(r['p50_us'])}  p99 {fmt_us(r['p99_us'])}  "
                        f"errors {r['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        server.stop()
    result: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "runtime_s": round(time.monotonic() - started, 1),
        "commit": git_commit(ROOT),
        "machine": machine_info(),
        "load_start": round(load_start, 2),
        "load_end": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "server_cmd": server.cmd,
        "seconds_per_shape": args.seconds,
        "chunk_bytes": chunk_bytes,
        "ratio_threshold": args.ratio_threshold,
        "break_even_n_4d": break_even(rows_4d, args.ratio_threshold),
        "break_even_n_2d": break_even(rows_2d, args.ratio_threshold),
        "fit_4d": {k: fit(rows_4d, k) for k in ("local_train", "remote_train", "remote_eval")},
        "rows_4d": rows_4d,
        "rows_2d": rows_2d,
        "scaling_shape": list(BENCH_SHAPE),
        "scaling_seconds": args.bench_seconds,
        "scaling": scaling,
    }
    if rows_4d or rows_2d:
        print(table(rows_4d + rows_2d))
    for kind, f in result["fit_4d"].items():
        if f:
            print(
                f"fit [N,64,28,28] {kind}: {fmt_us(f['fixed_us'])} per call + "
                f"{fmt_us(f['per_mib_us'])} per MiB"
            )
    for name, key in (("[N,64,28,28]", "break_even_n_4d"), ("[N,256]", "break_even_n_2d")):
        n = result[key]
        where = f"N >= {n}" if n is not None else "no N measured"
        print(f"{name}: remote TRAIN <= {args.ratio_threshold:g}x local TRAIN for {where}")
    if scaling:
        print(f"\nnormserve bench, closed loop, {list(BENCH_SHAPE)} float32 unary:")
        print(scaling_table(scaling))
    print(
        f"commit {result['commit']}, {result['machine']['cpu_count']} cores, load average "
        f"{result['load_start']:.2f} at start, {result['load_end']:.2f} at end, "
        f"{result['runtime_s']:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if args.bench_plot and any(r["plot"] for r in scaling):
        print(f"wrote {args.bench_plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
