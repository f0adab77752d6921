"""RMS-norm math (torch.nn.RMSNorm): each sample scaled by the root mean square of its trailing
dims, with no centering."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from normserve.server.ops._layernorm import _as, trailing_dims, work_dtype

__all__ = ["mean_square", "rms_eps", "rms_norm"]


def rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    """The eps RMS norm adds for inputs of ``dtype``: ``eps``, or for None torch's default, the
    machine epsilon of the dtype it computes in (float32 for float16 and bfloat16 too: torch's
    kernel takes its computation type's, not the input's, whatever its docs say)."""
    if eps is not None:
        return eps
    return float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)


def mean_square(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each sample's mean of squares over the last ``k`` dims, shaped ``x.shape[:-k]``."""
    work = x.to(work_dtype(x))
    return work.square().mean(dim=trailing_dims(work, k))


def rms_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    eps: float | None,
) -> torch.Tensor:
    """torch's RMS norm of ``x`` (its own kernel), in x's dtype; float16 and bfloat16 computed in
    float32 with the float32 weight."""
    dtype = work_dtype(x)
    out = F.rms_norm(x.to(dtype), list(normalized_shape), _as(weight, dtype), rms_eps(eps, x.dtype))
    return out if out.dtype == x.dtype else out.to(x.dtype)
