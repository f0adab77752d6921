"""Batch-norm kernels for CUDA in Triton: pivot-shifted statistics, the running update and the
normalization, each a pass over the batch at memory speed.

Why: torch's CUDA batch norm reaches 0.3-0.4 of the device's copy bandwidth on NCHW float32 and
far less on bfloat16, and normserve's pivot shift (for accuracy on ill-conditioned channels) cost
it one more pass; S and M shapes took ~0.16 ms in ~10 launches. Here a TRAIN batch is three
launches (or one for a small [R, C] batch): statistics, a [C]-sized finish (mean, variance, the
running update), and the normalization. That is two reads and one write of the batch, the floor,
with the pivot shift folded into the loads.

Layouts, both read in place (no copy):
- RC: the input as rows of C values, [R, C] with row stride C: a 2D batch [N, C], and a
  channels_last 4D/5D batch (N, H, W, C in memory), R = N * spatial.
- NCL: the input as [N, C, L] contiguous: NCHW (L = H * W), NCDHW, [N, C, L].

Statistics are sums of (x - pivot) in float32 over a tile, partial sums per (split, channel),
added in float64 by the finish: pivot-shifted values sit near zero, so float32 tiles keep their
precision where a channel's mean dwarfs its spread (the CPU path's argument, ops._batchnorm).
The pivot is each channel's first value. The output is ((x - pivot) - (mean - pivot)) * scale
+ bias, so nothing cancels either.

Tested on the CPU through Triton's interpreter (TRITON_INTERPRET=1, tests/ops/test_triton.py);
timed on the GPU machine by benchmarks/kernels.py (CUDA events against a device copy).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["applicable", "batch_norm_train", "moments_sums", "normalize"]

# A launch's programs: enough splits of the rows to fill the device with SMs x 4 programs.
_TARGET_PROGRAMS = 528
_MAX_SPLIT = 1024
# [R, C] batches with at most this many rows are done in one launch (small shapes: launch-bound).
_FUSED_ROWS = 4096


@triton.jit
def _from_sums(t1, t2, n):
    """float64 pivot-shifted sums of n values -> (mean - pivot, M2, biased variance)."""
    mean_d = t1 / n
    m2 = tl.maximum(t2 - t1 * mean_d, 0.0)
    return mean_d, m2, m2 / n


@triton.jit
def _update_running(rm_ptr, rv_ptr, cols, cmask, mean, var, factor, unbias):
    """torch's running update in place: lerp towards the mean and the unbiased variance."""
    rm = tl.load(rm_ptr + cols, mask=cmask, other=0.0)
    rv = tl.load(rv_ptr + cols, mask=cmask, other=0.0)
    tl.store(rm_ptr + cols, rm + factor * (mean.to(tl.float32) - rm), mask=cmask)
    tl.store(rv_ptr + cols, rv + factor * ((var * unbias).to(tl.float32) - rv), mask=cmask)


@triton.jit
def _rc_fused(
    x_ptr, y_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, mean_ptr, var_ptr,
    R, C, eps, factor, unbias,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RUN: tl.constexpr, WRITE_Y: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """One program per BLOCK_C channels of an [R, C] batch: statistics, running update and output
    in one launch (two reads and one write)."""
    cb = tl.program_id(0)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    pivot = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows[:, None] < R) & cmask[None, :]
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - pivot[None, :], 0.0)
        s1 += d
        s2 += d * d
    t1 = tl.sum(s1, axis=0).to(tl.float64)
    t2 = tl.sum(s2, axis=0).to(tl.float64)
    mean_d, _, var = _from_sums(t1, t2, R.to(tl.float64))
    mean = pivot.to(tl.float64) + mean_d
    tl.store(mean_ptr + cols, mean.to(tl.float32), mask=cmask)
    tl.store(var_ptr + cols, var.to(tl.float32), mask=cmask)
    if HAS_RUN:
        _update_running(rm_ptr, rv_ptr, cols, cmask, mean, var, factor, unbias)
    if WRITE_Y:
        scale = 1.0 / tl.sqrt(var.to(tl.float32) + eps)
        if HAS_W:
            scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0)
        shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_B:
            shift = tl.load(b_ptr + cols, mask=cmask, other=0.0)
        md = mean_d.to(tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            m = (rows[:, None] < R) & cmask[None, :]
            offs = rows[:, None] * C + cols[None, :]
            v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            y = ((v - pivot[None, :]) - md[None, :]) * scale[None, :] + shift[None, :]
            tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rc_sums(
    x_ptr, s1_ptr, s2_ptr, R, C, rows_per,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Partial pivot-shifted sums of an [R, C] batch: program (channel block, split) over rows
    [split * rows_per, (split + 1) * rows_per); writes s1, s2 [SPLIT, C] in float32."""
    cb = tl.program_id(0)
    sp = tl.program_id(1)
    cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    pivot = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    start = sp * rows_per
    end = tl.minimum(start + rows_per, R)
    a1 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        m = (rows[:, None] < end) & cmask[None, :]
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(tl.float32)
        d = tl.where(m, v - pivot[None, :], 0.0)
        a1 += d
        a2 += d * d
    tl.store(s1_ptr + sp * C + cols, tl.sum(a1, axis=0), mask=cmask)
    tl.store(s2_ptr + sp * C + cols, tl.sum(a2, axis=0), mask=cmask)


@triton.jit
def _ncl_sums(
    x_ptr, s1_ptr, s2_ptr, N, C, L, rows_per,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Partial pivot-shifted sums of an [N, C, L] batch: program (channel, split) over samples
    [split * rows_per, (split + 1) * rows_per); writes s1, s2 [SPLIT, C] in float32."""
    c = tl.program_id(0)
    sp = tl.program_id(1)
    pivot = tl.load(x_ptr + c * L).to(tl.float32)
    start = sp * rows_per
    end = tl.minimum(start + rows_per, N)
    a1 = tl.zeros((BLOCK_L,), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for n in range(start, end):
        base = x_ptr + n * C * L + c * L
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            m = offs < L
            v = tl.load(base + offs, mask=m, other=0.0).to(tl.float32)
            d = tl.where(m, v - pivot, 0.0)
            a1 += d
            a2 += d * d
    C64 = C.to(tl.int64)
    tl.store(s1_ptr + sp * C64 + c, tl.sum(a1, axis=0))
    tl.store(s2_ptr + sp * C64 + c, tl.sum(a2, axis=0))


@triton.jit
def _finish(
    s1_ptr, s2_ptr, pivot_ptr, pstride, pv_ptr, mean_ptr, var_ptr, md_ptr, m2_ptr, mean64_ptr,
    rm_ptr, rv_ptr, SPLIT, C, count, factor, unbias,
    HAS_RUN: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Per channel: the partial sums added in float64; mean and biased variance (float32, and
    float64 mean and M2 for merging), the pivot (float32) and mean - pivot for the normalization,
    and the running update."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    t1 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    t2 = tl.zeros((BLOCK_C,), dtype=tl.float64)
    for sp in range(0, SPLIT):
        t1 += tl.load(s1_ptr + sp * C + cols, mask=cmask, other=0.0).to(tl.float64)
        t2 += tl.load(s2_ptr + sp * C + cols, mask=cmask, other=0.0).to(tl.float64)
    mean_d, m2, var = _from_sums(t1, t2, count.to(tl.float64))
    pv = tl.load(pivot_ptr + cols * pstride, mask=cmask, other=0.0).to(tl.float32)
    tl.store(pv_ptr + cols, pv, mask=cmask)
    mean = pv.to(tl.float64) + mean_d
    tl.store(mean_ptr + cols, mean.to(tl.float32), mask=cmask)
    tl.store(var_ptr + cols, var.to(tl.float32), mask=cmask)
    tl.store(md_ptr + cols, mean_d.to(tl.float32), mask=cmask)
    tl.store(m2_ptr + cols, m2, mask=cmask)
    tl.store(mean64_ptr + cols, mean, mask=cmask)
    if HAS_RUN:
        _update_running(rm_ptr, rv_ptr, cols, cmask, mean, var, factor, unbias)


@triton.jit
def _rc_apply(
    x_ptr, y_ptr, pivot_ptr, pstride, md_ptr, var_ptr, w_ptr, b_ptr, R, C, eps,
    HAS_PIVOT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """y = ((x - pivot) - md) / sqrt(var + eps) * w + b over an [R, C] batch, a tile a program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    md = tl.load(md_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + cols, mask=cmask, other=1.0).to(tl.float32) + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + cols, mask=cmask, other=1.0)
    shift = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_B:
        shift = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    m = (rows[:, None] < R) & cmask[None, :]
    offs = rows[:, None].to(tl.int64) * C + cols[None, :]
    v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_PIVOT:
        v = v - tl.load(pivot_ptr + cols * pstride, mask=cmask, other=0.0).to(tl.float32)[None, :]
    y = (v - md[None, :]) * scale[None, :] + shift[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _ncl_apply(
    x_ptr, y_ptr, pivot_ptr, pstride, md_ptr, var_ptr, w_ptr, b_ptr, C, L, eps,
    HAS_PIVOT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """The same over an [N, C, L] batch: program (row n * C + c, block of L)."""
    row = tl.program_id(0)
    c = row % C
    offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    m = offs < L
    md = tl.load(md_ptr + c).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.load(var_ptr + c).to(tl.float32) + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c)
    shift = 0.0
    if HAS_B:
        shift = tl.load(b_ptr + c)
    base = row.to(tl.int64) * L
    v = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_PIVOT:
        v = v - tl.load(pivot_ptr + c * pstride).to(tl.float32)
    y = (v - md) * scale + shift
    tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=m)


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _layout(x: torch.Tensor) -> tuple[str, int, int, int] | None:
    """("rc", R, C, 0) or ("ncl", N, C, L) for a batch read in place, or None (other strides)."""
    if x.dim() == 2:
        return ("rc", x.shape[0], x.shape[1], 0) if x.is_contiguous() else None
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    if x.is_contiguous():
        return ("ncl", n, c, spatial)
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    if x.dim() in (4, 5) and x.is_contiguous(memory_format=fmt):
        return ("rc", n * spatial, c, 0)
    return None


def applicable(x: torch.Tensor) -> bool:
    """Whether these kernels take ``x``: float32/16/bfloat16 (float64 stays with torch), a
    layout read in place, at least one value and two per channel, 32-bit element offsets."""
    return (
        x.dtype in _DTYPES
        and x.dim() >= 2
        and x.numel() > 0
        and x.numel() < 2**31
        and x.numel() // x.shape[1] > 1
        and _layout(x) is not None
    )


def _splits(rows: int, programs_per_split: int) -> tuple[int, int]:
    split = max(1, min(_MAX_SPLIT, rows, _TARGET_PROGRAMS // max(1, programs_per_split)))
    rows_per = triton.cdiv(rows, split)
    return triton.cdiv(rows, rows_per), rows_per


def _pivot(x: torch.Tensor) -> torch.Tensor:
    """Each channel's first value, the one the kernels shift by: a strided view, no kernel."""
    return x.select(0, 0).flatten(1)[:, 0] if x.dim() > 2 else x[0]


def _sums(
    x: torch.Tensor, layout: tuple[str, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, int]:
    kind, a, c, spatial = layout
    if kind == "rc":
        block_c = 64 if c >= 64 else triton.next_power_of_2(c)
        split, rows_per = _splits(a, triton.cdiv(c, block_c))
        s1 = torch.empty((split, c), dtype=torch.float32, device=x.device)
        s2 = torch.empty_like(s1)
        _rc_sums[(triton.cdiv(c, block_c), split)](
            x, s1, s2, a, c, rows_per, BLOCK_R=32, BLOCK_C=block_c
        )
    else:
        split, rows_per = _splits(a, c)
        s1 = torch.empty((split, c), dtype=torch.float32, device=x.device)
        s2 = torch.empty_like(s1)
        block_l = min(1024, max(16, triton.next_power_of_2(spatial)))
        _ncl_sums[(c, split)](x, s1, s2, a, c, spatial, rows_per, BLOCK_L=block_l)
    return s1, s2, split


def _apply(
    x: torch.Tensor,
    layout: tuple[str, int, int, int],
    pivot: torch.Tensor | None,
    md: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    y = torch.empty_like(x)  # same strides: channels_last stays channels_last
    kind, a, c, spatial = layout
    flags = {"HAS_PIVOT": pivot is not None, "HAS_W": weight is not None, "HAS_B": bias is not None}
    p = pivot if pivot is not None else md
    pstride = p.stride(0)
    w = weight if weight is not None else md
    b = bias if bias is not None else md
    if kind == "rc":
        block_c = 64 if c >= 64 else triton.next_power_of_2(c)
        grid = (triton.cdiv(a, 32), triton.cdiv(c, block_c))
        _rc_apply[grid](
            x, y, p, pstride, md, var, w, b, a, c, eps, BLOCK_R=32, BLOCK_C=block_c, **flags
        )
    else:
        block_l = min(2048, max(16, triton.next_power_of_2(spatial)))
        grid = (a * c, triton.cdiv(spatial, block_l))
        _ncl_apply[grid](x, y, p, pstride, md, var, w, b, c, spatial, eps, BLOCK_L=block_l, **flags)
    return y


def moments_sums(
    x: torch.Tensor,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (count, mean float64, M2 float64, pivot float32, mean float32, biased var
    float32) of a batch the kernels take (``applicable``): one pass over it and one [C]-sized
    launch. The pivot is what ``normalize(..., pivot=)`` shifts by for these moments."""
    layout = _layout(x)
    assert layout is not None
    count = x.numel() // x.shape[1]
    s1, s2, split = _sums(x, layout)
    return _finished(x, layout, s1, s2, split, count, None, 0.0)[:6]


def _finished(
    x: torch.Tensor,
    layout: tuple[str, int, int, int],
    s1: torch.Tensor,
    s2: torch.Tensor,
    split: int,
    count: int,
    running: tuple[torch.Tensor, torch.Tensor] | None,
    factor: float,
) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    c = layout[2]
    first = _pivot(x)
    mean = torch.empty(c, dtype=torch.float32, device=x.device)
    var, md, pivot = torch.empty_like(mean), torch.empty_like(mean), torch.empty_like(mean)
    m2 = torch.empty(c, dtype=torch.float64, device=x.device)
    mean64 = torch.empty_like(m2)
    rm, rv = running if running is not None else (mean, mean)
    block_c = min(256, triton.next_power_of_2(c))
    _finish[(triton.cdiv(c, block_c),)](
        s1, s2, first, first.stride(0), pivot, mean, var, md, m2, mean64, rm, rv,
        split, c, count, factor, count / max(count - 1, 1),
        HAS_RUN=running is not None, BLOCK_C=block_c,
    )  # fmt: skip
    return count, mean64, m2, pivot, mean, var, md


def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: tuple[torch.Tensor, torch.Tensor] | None,
    factor: float,
    write_output: bool = True,
) -> tuple[
    torch.Tensor | None, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None
]:
    """ops.batch_norm_train for a batch the kernels take: (output, mean, biased var, new running
    statistics). The running statistics given are not changed: the update writes new tensors."""
    layout = _layout(x)
    assert layout is not None
    c = layout[2]
    new = None if running is None else (running[0].clone(), running[1].clone())
    count = x.numel() // c
    if layout[0] == "rc" and layout[1] <= _FUSED_ROWS:
        y = torch.empty_like(x) if write_output else None
        mean = torch.empty(c, dtype=torch.float32, device=x.device)
        var = torch.empty_like(mean)
        block_c = 32 if c >= 32 else triton.next_power_of_2(c)
        rm, rv = new if new is not None else (mean, mean)
        _rc_fused[(triton.cdiv(c, block_c),)](
            x, y if y is not None else x, weight if weight is not None else mean,
            bias if bias is not None else mean, rm, rv, mean, var,
            layout[1], c, eps, factor, count / max(count - 1, 1),
            HAS_W=weight is not None, HAS_B=bias is not None, HAS_RUN=new is not None,
            WRITE_Y=write_output, BLOCK_R=32, BLOCK_C=block_c,
        )  # fmt: skip
        return y, mean, var, new
    s1, s2, split = _sums(x, layout)
    _, _, _, pivot, mean, var, md = _finished(x, layout, s1, s2, split, count, new, factor)
    y = _apply(x, layout, pivot, md, var, weight, bias, eps) if write_output else None
    return y, mean, var, new


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    pivot: torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias per channel (EVAL, a stream's chunks); with
    ``pivot``, ``mean`` is taken as mean - pivot and x is shifted by the pivot first."""
    layout = _layout(x)
    assert layout is not None
    return _apply(x, layout, pivot, mean.float(), var.float(), weight, bias, eps)
