"""Layer-norm math (torch.nn.LayerNorm): each sample normalized over its trailing dims."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["layer_norm", "layer_norm_moments", "trailing_dims", "work_dtype"]


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``x`` is computed in: float64 as itself, the rest in float32 (as torch does)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def trailing_dims(x: torch.Tensor, k: int) -> list[int]:
    """The last ``k`` dims of ``x``."""
    return list(range(x.dim() - k, x.dim()))


def layer_norm_moments(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's mean and biased variance over the last ``k`` dims, shaped
    ``x.shape[:-k]``, in the compute dtype. Computed directly (torch's two-pass kernel), not
    recovered from 1 / sqrt(var + eps), which loses the variance where it is small next to eps."""
    work = x.to(work_dtype(x))
    var, mean = torch.var_mean(work, dim=trailing_dims(work, k), correction=0)
    return mean, var


def layer_norm(
    x: torch.Tensor,
    normalized_shape: Sequence[int],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """torch's layer norm of ``x`` (its own kernel, so its arithmetic), in x's dtype; float16 and
    bfloat16 are computed in float32 with the float32 parameters."""
    dtype = work_dtype(x)
    out = F.layer_norm(
        x.to(dtype), list(normalized_shape), _as(weight, dtype), _as(bias, dtype), eps
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)
