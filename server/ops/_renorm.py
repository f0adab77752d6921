"""Batch renormalization (Ioffe 2017, Algorithm 1): batch statistics corrected towards the running
ones by r and d, which the backward holds constant."""

from __future__ import annotations

import torch

__all__ = ["renorm_factors", "renorm_statistics"]


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
