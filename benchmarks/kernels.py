"""Kernel figures on a CUDA device: normserve's batch-norm kernels against the device's copy
bandwidth and torch's own kernels, timed by CUDA events.

    python benchmarks/kernels.py [--json FILE] [--reps 50]

Effective bandwidth counts what a pass must move at least: TRAIN 3x the batch's bytes (two reads,
one write), EVAL 2x (one read, one write), the statistics of a stream's chunk 1x (one read). The
roof is a plain device copy of the same tensor (read + write), so "of copy" is the share of what
the memory system delivers to the simplest kernel. The rows:

- ``ops.batch_norm_train``: what a session's TRAIN call runs (output, statistics, running update),
  through the kernels the server uses (Triton where installed, see ops._batchnorm.CUDA_KERNELS),
  and through torch's (NORMSERVE_CUDA_KERNELS=torch) for the before;
- torch: ``F.batch_norm`` in training mode on the same tensor (NCHW and channels_last);
- ``ops.normalize``: EVAL; ``ops.moments``: the statistics of one chunk of a stream;
- S [64, 256] and M [256, 1024] TRAIN: device time per call, in microseconds (launch-bound).

Prints a markdown table; needs CUDA (exits 2 without it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from normserve.server import ops
from normserve.server.ops import _batchnorm

BIG = [
    ("L [32,64,56,56]", (32, 64, 56, 56)),
    ("[256,64,56,56]", (256, 64, 56, 56)),
    ("[8192,4096]", (8192, 4096)),
]
SMALL = [("S [64,256]", (64, 256)), ("M [256,1024]", (256, 1024))]


def event_seconds(fn: Callable[[], Any], reps: int) -> float:
    """Median device seconds of ``fn`` over ``reps`` runs, each between two CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def with_kernels(which: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        saved = _batchnorm.CUDA_KERNELS
        _batchnorm.CUDA_KERNELS = which
        try:
            return fn()
        finally:
            _batchnorm.CUDA_KERNELS = saved

    return run


def measure(shape: tuple[int, ...], dtype: torch.dtype, cl: bool, reps: int) -> dict[str, Any]:
    x = torch.randn(shape, device="cuda", dtype=torch.float32).mul_(2).add_(1).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w, b = torch.ones(c, device="cuda"), torch.zeros(c, device="cuda")
    rm, rv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    nbytes = x.numel() * x.element_size()
    y = torch.empty_like(x)
    copy = event_seconds(lambda: y.copy_(x), reps)
    roof = 2 * nbytes / copy

    def train() -> Any:
        return ops.batch_norm_train(x, w, b, 1e-5, (rm, rv), 0.1)

    rm_t, rv_t = rm.clone(), rv.clone()
    t = {
        "copy": copy,
        "train": event_seconds(with_kernels("triton", train), reps),
        "train_torch_path": event_seconds(with_kernels("torch", train), reps),
        "torch_train": event_seconds(
            lambda: F.batch_norm(x, rm_t, rv_t, w, b, True, 0.1, 1e-5), reps
        ),
        "eval": event_seconds(
            with_kernels("triton", lambda: ops.normalize(x, rm, rv, w, b, 1e-5)), reps
        ),
        "torch_eval": event_seconds(lambda: F.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5), reps),
        "moments": event_seconds(with_kernels("triton", lambda: ops.moments(x)), reps),
        "moments_torch_path": event_seconds(with_kernels("torch", lambda: ops.moments(x)), reps),
    }
    moved = {"train": 3, "train_torch_path": 3, "torch_train": 3, "eval": 2, "torch_eval": 2}
    moved |= {"moments": 1, "moments_torch_path": 1, "copy": 2}
    return {
        "bytes": nbytes,
        "roof_GBps": roof / 1e9,
        "seconds": t,
        "of_copy": {k: moved[k] * nbytes / s / roof for k, s in t.items()},
        "GBps": {k: moved[k] * nbytes / s / 1e9 for k, s in t.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write every figure here")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name(0)
    print(f"# Kernel figures: {dev}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    print(
        f"kernels: {_batchnorm.CUDA_KERNELS}; Triton loaded: {_batchnorm._triton not in (None, False)}\n"
    )
    rows: dict[str, Any] = {}
    print(
        "| shape | dtype | layout | copy GB/s | TRAIN (of copy) | before: torch path | "
        "torch F.batch_norm | EVAL | torch EVAL | chunk statistics | before |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, shape in BIG:
        for dtype in (torch.float32, torch.bfloat16):
            for cl in (False, True) if len(shape) == 4 else (False,):
                r = measure(shape, dtype, cl, args.reps)
                key = f"{name} {str(dtype)[6:]} {'channels_last' if cl else 'contiguous'}"
                rows[key] = r
                o, gb = r["of_copy"], r["GBps"]
                print(
                    f"| {name} | {str(dtype)[6:]} | {'NHWC' if cl else 'NCHW' if len(shape) == 4 else '-'} "
                    f"| {r['roof_GBps']:.0f} | {gb['train']:.0f} ({o['train']:.2f}) "
                    f"| {o['train_torch_path']:.2f} | {o['torch_train']:.2f} | {o['eval']:.2f} "
                    f"| {o['torch_eval']:.2f} | {o['moments']:.2f} | {o['moments_torch_path']:.2f} |"
                )
    print("\n| small shape | TRAIN device time | before: torch path | torch F.batch_norm |")
    print("|---|---|---|---|")
    for name, shape in SMALL:
        r = measure(shape, torch.float32, False, args.reps * 4)
        rows[name] = r
        s = r["seconds"]
        print(
            f"| {name} | {s['train'] * 1e6:.1f} us | {s['train_torch_path'] * 1e6:.1f} us "
            f"| {s['torch_train'] * 1e6:.1f} us |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
