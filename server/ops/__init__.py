"""Pure torch normalization math, a module per kind: no sessions, no network.

Everything here is a function of its tensor arguments, tested directly against torch.
"""

from __future__ import annotations

from normserve.server.ops._batchnorm import (
    Moments,
    batch_norm_train,
    batch_shift,
    ema_factor,
    merge_moments,
    moments,
    normalize,
    normalize_batch,
    reduce_dims,
    update_running,
)
from normserve.server.ops._ghostnorm import ghost_splits
from normserve.server.ops._groupnorm import group_norm, group_norm_moments
from normserve.server.ops._instancenorm import (
    instance_norm,
    instance_norm_moments,
    update_running_instances,
)
from normserve.server.ops._layernorm import layer_norm, layer_norm_moments, work_dtype
from normserve.server.ops._renorm import renorm_apply, renorm_factors, renorm_statistics
from normserve.server.ops._rmsnorm import mean_square, rms_eps, rms_norm

__all__ = [
    "Moments",
    "batch_norm_train",
    "batch_shift",
    "ema_factor",
    "ghost_splits",
    "group_norm",
    "group_norm_moments",
    "instance_norm",
    "instance_norm_moments",
    "layer_norm",
    "layer_norm_moments",
    "mean_square",
    "merge_moments",
    "moments",
    "normalize",
    "normalize_batch",
    "reduce_dims",
    "renorm_apply",
    "renorm_factors",
    "renorm_statistics",
    "rms_eps",
    "rms_norm",
    "update_running",
    "update_running_instances",
    "work_dtype",
]
