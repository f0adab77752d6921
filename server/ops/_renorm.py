"""Batch renormalization (Ioffe 2017, Algorithm 1): batch statistics corrected towards the running
ones by r and d, which the backward holds constant."""

from __future__ import annotations

import torch

from normserve.server.ops._batchnorm import Moments, normalize_batch

__all__ = ["renorm_apply", "renorm_factors", "renorm_statistics"]


def renorm_factors(
    mean_b: torch.Tensor,
    var_b: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    rmax: float,
    dmax: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per channel r = clip(sigma_B / sigma, 1/rmax, rmax) and d = clip((mu_B - mu) / sigma,
    -dmax, dmax), in float64, with sigma_B = sqrt(var_b + eps) (var_b the batch's biased
    variance) and sigma = sqrt(running_var + eps) (the running statistics before the batch)."""
    mean_b, var_b = mean_b.double(), var_b.double()
    mu, sigma = running_mean.double(), (running_var.double() + eps).sqrt()
    sigma_b = (var_b + eps).sqrt()
    r = (sigma_b / sigma).clamp(1.0 / rmax, rmax)
    d = ((mean_b - mu) / sigma).clamp(-dmax, dmax)
    return r, d


def renorm_statistics(
    mean_b: torch.Tensor, var_b: torch.Tensor, r: torch.Tensor, d: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (mean, var) that ``(x - mean) / sqrt(var + eps)`` turns into the paper's
    ``(x - mu_B) / sigma_B * r + d``: mean = mu_B - d * sigma_B / r, var = sigma_B^2 / r^2 - eps
    (>= 0 whatever r's clip: sigma_B^2 >= eps and r <= max(1, sigma_B / sigma)), in float64."""
    mean_b, var_b = mean_b.double(), var_b.double()
    scale = (var_b + eps).sqrt() / r  # sigma_B / r
    return mean_b - d * scale, (scale.square() - eps).clamp_min(0.0)


def renorm_apply(
    x: torch.Tensor,
    m: Moments,
    shift: torch.Tensor | None,
    r: torch.Tensor,
    d: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The paper's output, ``((x - mu_B) / sigma_B * r + d) * weight + bias``, in x's dtype:
    x_hat_B as batch norm computes it from the batch's moments ``m`` (``normalize_batch``, around
    ``shift``), then one per-channel scale and offset folded in float64. More accurate than
    normalizing with the effective statistics, whose mean cancels against x when d is large."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    x_hat = normalize_batch(work, m, None, None, eps, shift)
    scale, offset = r, d
    if weight is not None:
        w = weight.double()
        scale, offset = r * w, d * w
    if bias is not None:
        offset = offset + bias.double()
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = torch.addcmul(
        offset.to(x_hat.dtype).view(shape), x_hat, scale.to(x_hat.dtype).view(shape)
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)
