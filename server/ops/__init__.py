"""Pure torch normalization math: no sessions, no network.

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
