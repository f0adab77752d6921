"""Instance-norm math (torch.nn.InstanceNorm1d/2d/3d): each sample's channels normalized over
their spatial dims; running statistics updated with the batch's average instance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from normserve.server.ops._layernorm import _as, work_dtype

__all__ = ["instance_norm", "instance_norm_moments", "update_running_instances"]


def instance_norm_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each instance's (sample and channel's) mean and biased variance, [N, C], in the compute
    dtype (x: [N, C, *] with values in it)."""
    work = x.to(work_dtype(x)).reshape(x.shape[0], x.shape[1], -1)
    var, mean = torch.var_mean(work, dim=2, correction=0)
    return mean, var


def instance_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """torch's instance norm of ``x`` with its own statistics (its own kernel), in x's dtype."""
    dtype = work_dtype(x)
    out = F.instance_norm(
        x.to(dtype), None, None, _as(weight, dtype), _as(bias, dtype), True, 0.0, eps
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def update_running_instances(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New running statistics ([C]; new tensors) after instances of ``count`` values each with
    these means and biased variances ([N, C]), as torch updates them: every instance updates its
    own copy of the running statistics with its mean and *unbiased* variance, and the copies are
    averaged, which is the update with the batch's average instance."""
    dtype = running_mean.dtype
    batch_mean = mean.to(torch.float64).mean(dim=0).to(dtype)
    batch_var = (var.to(torch.float64) * (count / (count - 1))).mean(dim=0).to(dtype)
    return torch.lerp(running_mean, batch_mean, factor), torch.lerp(running_var, batch_var, factor)
