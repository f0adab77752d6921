"""Batch-norm math as pure torch functions: moments, Chan merging, normalization, running updates."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

__all__ = [
    "Moments",
    "batch_norm_train",
    "batch_shift",
    "ema_factor",
    "merge_moments",
    "moments",
    "normalize",
    "normalize_batch",
    "reduce_dims",
    "update_running",
]

#: Which kernels CUDA batches go through: "triton" (ops._triton, where Triton is installed and the
#: batch's dtype and layout suit it) or "torch" (torch's own kernels, always).
CUDA_KERNELS = os.environ.get("NORMSERVE_CUDA_KERNELS", "triton")
#: Tests only: run the Triton kernels on CPU tensors too (with TRITON_INTERPRET=1, Triton's
#: interpreter), so that the CUDA path's dispatch is exercised where there is no GPU.
_KERNELS_ON_CPU = False
_triton: ModuleType | bool | None = False  # False: not tried yet; None: unavailable


def _kernels(x: torch.Tensor) -> ModuleType | None:
    """ops._triton when it takes ``x`` (a CUDA batch of a dtype and layout it reads in place)."""
    global _triton
    if CUDA_KERNELS != "triton" or (x.device.type != "cuda" and not _KERNELS_ON_CPU):
        return None
    if _triton is False:
        try:
            from normserve.server.ops import _triton as module

            _triton = module
        except ImportError:  # no Triton: torch's kernels
            _triton = None
    if _triton is None or not _triton.applicable(x):  # type: ignore[union-attr]
        return None
    return _triton  # type: ignore[return-value]


# Statistics are accumulated and merged in float64: [C]-sized, so the cost is nil, and merging many
# chunks in float32 would lose the precision the pivot shift below wins.
_ACC = torch.float64


@dataclass(frozen=True)
class Moments:
    """Per-channel count, mean and M2 (sum of squared deviations) of a batch, in float64."""

    count: int
    mean: torch.Tensor
    m2: torch.Tensor
    #: The per-channel value the sums were taken around (the first batch's, after a merge), in the
    #: compute dtype: ``normalize_batch`` shifts by it where a channel is ill-conditioned.
    pivot: torch.Tensor | None = None

    @property
    def var(self) -> torch.Tensor:
        """Biased variance (what normalization divides by)."""
        return self.m2 / self.count


def reduce_dims(x: torch.Tensor) -> list[int]:
    """The dims batch norm reduces over: all but the channel dim 1."""
    return [0, *range(2, x.dim())]


def _work(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 are computed in float32, as torch does."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _pivot(x: torch.Tensor) -> torch.Tensor:
    """Per channel, the mean of a few of its first values: a value near the channel's mean, [C]."""
    if x.dim() == 2:
        return x[:8].mean(dim=0)
    return x[0].reshape(x.shape[1], -1)[:, :8].mean(dim=1)


def _broadcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.view(1, -1, *([1] * (ndim - 2)))


def _first(x: torch.Tensor) -> torch.Tensor:
    """Each channel's first value, as a view shaped to broadcast against x: the pivot."""
    return (
        x[0:1] if x.dim() == 2 else x[(slice(0, 1), slice(None), *([slice(0, 1)] * (x.dim() - 2)))]
    )


Running = tuple[torch.Tensor, torch.Tensor]


def batch_norm_train(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: Running | None = None,
    factor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Running | None]:
    """Normalizes ``x`` ([N, C, *]) with its own statistics. Returns the output (x's dtype), the
    batch mean and biased variance per channel (compute dtype), and, given ``running`` (mean, var),
    new running statistics updated as torch does with ``factor`` (new tensors; inputs untouched).

    One fused torch kernel computes output, statistics and running update. Its variance is accurate
    to ~1e-6 relative while a channel's |mean|/std stays below ~1e3, and degrades quadratically
    beyond (mean 1e4, std 1e-2: ~2e-3). So on the CPU the kernel runs on the batch as it is, and a
    channel past the bound (~1 in 10^5 of real activations) sends the batch through again shifted
    by a per-channel pivot, its first value: shifting changes nothing mathematically (the running
    mean is shifted and shifted back) and is exact in float32 (Sterbenz), and on shifted data the
    kernel is accurate to ~1e-6 even when the pivot is an outlier. On CUDA, where a kernel costs
    microseconds and a host-side check a synchronization, the batch is always shifted. The
    variance is recovered from the kernel's 1/sqrt(var + eps), to ~1e-7 of (var + eps).

    On CUDA with Triton (``CUDA_KERNELS``), ops._triton does the same in three passes at memory
    speed (one launch for a small [N, C] batch), always pivot-shifted.
    """
    kernels = _kernels(x)
    if kernels is not None:
        return kernels.batch_norm_train(x, weight, bias, eps, running, factor)  # type: ignore[no-any-return]
    work = _work(x)
    if work.numel() == 0:
        return _empty_batch(x, running)
    if work.dtype == torch.float64:
        out, mean, var, _ = _fused(work, weight, bias, eps, None, 0.0, shift=True)
        new = None
        if running is not None:
            count = work.numel() // work.shape[1]
            new = update_running(running[0], running[1], mean, var, count, factor)
    elif work.device.type == "cpu":
        out, mean, var, new = _fused(work, weight, bias, eps, running, factor, shift=False)
        if _ill_conditioned(mean, var):
            out, mean, var, new = _exact_train(work, weight, bias, eps, running, factor)
    else:
        out, mean, var, new = _fused(work, weight, bias, eps, running, factor, shift=True)
    if out.dtype != x.dtype:
        out = out.to(x.dtype)
    return out, mean, var, new


def _exact_train(
    work: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: Running | None,
    factor: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Running | None]:
    """The CPU path for a batch with an ill-conditioned channel (rare): statistics of the
    pivot-shifted batch with float64 accumulation (the fused kernel's float32 accumulation over N
    leaves ~1e-6..1e-5 of relative variance error there), then torch's inference kernel on the
    shifted values, whose mean is small, so nothing cancels."""
    count = work.numel() // work.shape[1]
    pivot = _first(work)
    d = work - pivot  # exact in float32 (Sterbenz) for values within 2x of the pivot
    mean_d = d.sum(dim=reduce_dims(d), dtype=torch.float64) / count
    var = _direct_variance(d, mean_d)
    out = normalize(d, mean_d.float(), var.float(), weight, bias, eps)
    mean = (mean_d + pivot.reshape(-1).double()).float()
    var = var.float()
    new = None
    if running is not None:
        new = update_running(running[0], running[1], mean, var, count, factor)
    return out, mean, var, new


def _empty_batch(
    x: torch.Tensor, running: Running | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Running | None]:
    """A batch with no values (N = 0, or a zero spatial dim): torch returns an empty output and
    leaves the running statistics as they were; the batch statistics are undefined (NaN)."""
    nan = torch.full((x.shape[1],), float("nan"), dtype=torch.float32, device=x.device)
    new = None if running is None else (running[0].clone(), running[1].clone())
    return torch.empty_like(x), nan, nan.clone(), new


# |mean| / std beyond which the unshifted kernel's variance loses precision (measured: ~1e-6
# relative at 1e3 on float32, ~1e-4 at 1e4); with a 3x margin.
_CONDITION = 300.0


def _ill_conditioned(mean: torch.Tensor, var: torch.Tensor) -> bool:
    m, v = mean.numpy(), var.numpy()
    return bool(np.any(m * m > (_CONDITION * _CONDITION) * v))


def _fused(
    work: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    running: Running | None,
    factor: float,
    shift: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Running | None]:
    if work.dtype == torch.float64:
        weight = None if weight is None else weight.double()
        bias = None if bias is None else bias.double()
    flat = None
    if shift:
        pivot = _first(work)
        work = work - pivot
        flat = pivot.reshape(-1)
    new: Running | None = None
    if running is None:
        out, mean, invstd = torch.native_batch_norm(work, weight, bias, None, None, True, 0.0, eps)
    else:
        # the kernel updates running statistics in place: give it copies (the snapshot stays)
        rm = running[0] - flat if flat is not None else running[0].clone()
        rv = running[1].clone()
        out, mean, invstd = torch.native_batch_norm(work, weight, bias, rm, rv, True, factor, eps)
        new = (rm.add_(flat) if flat is not None else rm, rv)
    var = _variance(work, mean, invstd, eps)
    if flat is not None:
        mean = mean.add_(flat)
    return out, mean, var, new


def _variance(
    work: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, eps: float
) -> torch.Tensor:
    """The biased variance per channel. Recovered from the kernel's 1/sqrt(var + eps), it carries
    about one ulp of (var + eps): ~1e-7 relative while var >= eps, but up to 1e-2 when var << eps.
    Channels below 4 * eps are computed again directly (a second pass over the batch, rare on
    real activations). On CUDA, where a host-side check costs a synchronization, always directly."""
    if invstd.device.type != "cpu":
        return _direct_variance(work, mean)
    inv = invstd.numpy()  # [C]-sized arithmetic is cheaper in numpy than in torch
    var_np = np.reciprocal(inv * inv)
    var_np -= eps
    np.maximum(var_np, 0.0, out=var_np)
    small = var_np < 4 * eps
    if small.any():
        direct = _direct_variance(work, mean).numpy()
        var_np = np.where(small, direct, var_np).astype(var_np.dtype, copy=False)
    return torch.from_numpy(var_np)


def _direct_variance(work: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Biased variance of ``work`` around its (already computed) ``mean``, the sums accumulated in
    float64: mean(d^2) - mean(d)^2 with d = x - mean, where mean(d) ~ 0 leaves no cancellation."""
    dims = reduce_dims(work)
    count = work.numel() // work.shape[1]
    d = work - _broadcast(mean.to(work.dtype), work.dim())
    s1 = d.sum(dim=dims, dtype=torch.float64)
    s2 = d.square_().sum(dim=dims, dtype=torch.float64)
    var = (s2 / count - (s1 / count).square_()).clamp_min_(0.0)
    return var.to(mean.dtype)


def moments(x: torch.Tensor) -> Moments:
    """Per-channel moments of ``x`` ([N, C, *]) without normalizing it (chunks of a streamed batch,
    statistics-only calls). Sums of pivot-shifted values, widened to float64 for merging: shifted
    values sit near zero, so float32 sums keep their precision where the data's mean dwarfs its
    spread. Each sum is one fast reduction (torch.var_mean's Welford kernel is 5-10x slower).
    On CUDA with Triton: one pass (ops._triton)."""
    kernels = _kernels(x)
    if kernels is not None:
        count, mean64, m2, pivot, _, _ = kernels.moments_sums(x)
        return Moments(count, mean64, m2, pivot)
    work = _work(x)
    dims = reduce_dims(work)
    count = work.numel() // work.shape[1]
    pivot = _pivot(work)
    d = work - _broadcast(pivot, work.dim())
    s1 = d.sum(dim=dims)
    s2 = d.square_().sum(dim=dims)
    if s1.device.type == "cpu":  # [C]-sized float64 arithmetic: numpy, a fraction of torch's cost
        a1, a2 = s1.numpy().astype(np.float64), s2.numpy().astype(np.float64)
        mean = pivot.numpy().astype(np.float64) + a1 / count
        m2 = np.maximum(a2 - a1 * a1 / count, 0.0)
        return Moments(count, torch.from_numpy(mean), torch.from_numpy(m2), pivot)
    s = torch.stack((s1, s2, pivot)).to(_ACC)
    mean_t = torch.add(s[2], s[0], alpha=1.0 / count)
    m2_t = torch.addcmul(s[1], s[0], s[0], value=-1.0 / count).clamp_min_(0.0)
    return Moments(count=count, mean=mean_t, m2=m2_t, pivot=pivot)


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s parallel combination: the moments of the concatenation of two batches."""
    if a.count == 0:
        return b
    if b.count == 0:
        return a
    n = a.count + b.count
    if a.mean.device.type == "cpu":
        am, bm = a.mean.numpy(), b.mean.numpy()
        delta = bm - am
        mean = am + delta * (b.count / n)
        m2 = a.m2.numpy() + b.m2.numpy() + delta * delta * (a.count * b.count / n)
        return Moments(n, torch.from_numpy(mean), torch.from_numpy(m2), a.pivot)
    delta_t = b.mean - a.mean
    mean_t = a.mean + delta_t * (b.count / n)
    m2_t = a.m2 + b.m2 + delta_t * delta_t * (a.count * b.count / n)
    return Moments(count=n, mean=mean_t, m2=m2_t, pivot=a.pivot)


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, in x's dtype.

    Uses torch's own inference kernel so the arithmetic is torch's (float16/bfloat16 inputs with
    float32 statistics are computed in float32, as torch does). On CUDA with Triton: ops._triton's
    kernel, one read and one write.
    """
    kernels = _kernels(x)
    if kernels is not None:
        return kernels.normalize(x, mean, var, weight, bias, eps)  # type: ignore[no-any-return]
    if x.dtype == torch.float64:
        mean, var = mean.double(), var.double()
        weight = None if weight is None else weight.double()
        bias = None if bias is None else bias.double()
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, True)


def batch_shift(m: Moments) -> torch.Tensor | None:
    """The pivot ``normalize_batch`` must shift by for these (merged) moments, or None: on the CPU
    only where a channel's |mean| / std is past the float32 bound (a host-side check is cheap
    there); on CUDA always (a check would synchronize)."""
    if m.pivot is None:
        return None
    if m.pivot.dtype == torch.float64 or m.mean.device.type != "cpu":
        # float64: torch's inference kernel folds the mean into its bias (x * a + (b - mean * a)),
        # which cancels at |mean| / std ~ 1e6 even in float64; float64 batches are rare, shift all
        return m.pivot
    return m.pivot if _ill_conditioned(m.mean, m.var) else None


def normalize_batch(
    x: torch.Tensor,
    m: Moments,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    shift: torch.Tensor | None,
) -> torch.Tensor:
    """Normalizes ``x`` (a chunk of a streamed batch) with the batch's merged float64 moments, as
    accurately as ``batch_norm_train`` normalizes a whole batch: float64 inputs with float64
    statistics; others in float32, around ``shift`` (``batch_shift(m)``) where a channel is
    ill-conditioned, since x - shift is exact in float32 (Sterbenz) while rounding the mean to
    float32 first would cost up to |mean| * 2^-24 / std of relative error."""
    kernels = _kernels(x)
    if kernels is not None:
        mean_d = m.mean if shift is None else m.mean - shift.to(m.mean.dtype)
        return kernels.normalize(x, mean_d, m.var, weight, bias, eps, pivot=shift)  # type: ignore[no-any-return]
    work, mean, var = _work(x), m.mean, m.var
    if shift is not None:
        work = work - _broadcast(shift, work.dim())
        mean = mean - shift.to(mean.dtype)
    if x.dtype == torch.float64:
        return normalize(work, mean, var, weight, bias, eps)
    out = normalize(work, mean.float(), var.float(), weight, bias, eps)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def ema_factor(momentum: float | None, num_batches_tracked: int) -> float:
    """torch's exponential_average_factor: ``momentum``, or 1/n (cumulative) when it is None.

    ``num_batches_tracked`` is the count after this batch, as torch increments it first.
    """
    if momentum is None:
        return 1.0 / num_batches_tracked
    return momentum


def update_running(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New running statistics (new tensors; the inputs are untouched), as torch updates them:
    the mean with the batch mean, the variance with the batch's *unbiased* variance (``var`` is
    the biased one over ``count`` values per channel)."""
    dtype = running_mean.dtype
    new_mean = torch.lerp(running_mean, mean.to(dtype), factor)
    new_var = torch.lerp(running_var, var.to(dtype) * (count / (count - 1)), factor)
    return new_mean, new_var
