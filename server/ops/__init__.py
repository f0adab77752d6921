"""Pure torch normalization math: no sessions, no network.

Everything here is a function of its tensor arguments, tested directly against torch.
"""

from __future__ import annotations

from normserve.server.ops._batchnorm import (
    Moments,
    batch_norm_train,
    ema_factor,
    merge_moments,
    moments,
    normalize,
    reduce_dims,
    update_running,
)

__all__ = [
    "Moments",
    "batch_norm_train",
    "ema_factor",
    "merge_moments",
    "moments",
    "normalize",
    "reduce_dims",
    "update_running",
]
