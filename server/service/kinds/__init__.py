"""Normalization kinds behind one interface (``Normalization``); ``for_config`` picks one."""

from __future__ import annotations

from normserve.server.service._config import Kind, SessionConfig
from normserve.server.service.kinds._base import Normalization, Step
from normserve.server.service.kinds._batch_norm import BatchNorm
from normserve.server.service.kinds._batch_renorm import BatchRenorm
from normserve.server.service.kinds._ghost_batch_norm import GhostBatchNorm
from normserve.server.service.kinds._group_norm import GroupNorm
from normserve.server.service.kinds._instance_norm import InstanceNorm
from normserve.server.service.kinds._layer_norm import LayerNorm, RMSNorm
from normserve.server.service.kinds._recurrent_batch_norm import RecurrentBatchNorm

__all__ = [
    "KINDS",
    "BatchNorm",
    "BatchRenorm",
    "GhostBatchNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "Normalization",
    "RMSNorm",
    "RecurrentBatchNorm",
    "Step",
    "for_config",
]

KINDS: dict[Kind, type[Normalization]] = {
    Kind.BATCH_NORM: BatchNorm,
    Kind.LAYER_NORM: LayerNorm,
    Kind.GROUP_NORM: GroupNorm,
    Kind.INSTANCE_NORM: InstanceNorm,
    Kind.RMS_NORM: RMSNorm,
    Kind.BATCH_RENORM: BatchRenorm,
    Kind.GHOST_BATCH_NORM: GhostBatchNorm,
    Kind.RECURRENT_BATCH_NORM: RecurrentBatchNorm,
}


def for_config(config: SessionConfig) -> Normalization:
    return KINDS[config.kind](config)
