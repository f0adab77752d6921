"""Group-norm math (torch.nn.GroupNorm): each sample's channels split into groups, each group
normalized over its channels and spatial dims."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normserve.server.ops._layernorm import _as, work_dtype

__all__ = ["group_norm", "group_norm_moments"]


def group_norm_moments(x: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's per-group mean and biased variance, [N, num_groups], in the compute dtype
    (x: [N, C, *] with values in it)."""
    work = x.to(work_dtype(x)).reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(work, dim=2, correction=0)
    return mean, var


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """torch's group norm of ``x`` (its own kernel), in x's dtype."""
    dtype = work_dtype(x)
    out = F.group_norm(x.to(dtype), num_groups, _as(weight, dtype), _as(bias, dtype), eps)
    return out if out.dtype == x.dtype else out.to(x.dtype)
