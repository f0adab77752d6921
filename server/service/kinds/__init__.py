"""Normalization kinds behind one interface (``Normalization``); ``for_config`` picks one."""

from __future__ import annotations

from normserve.server.service._config import Kind, SessionConfig
from normserve.server.service.kinds._base import Normalization, Step
from normserve.server.service.kinds._batch_norm import BatchNorm

__all__ = ["KINDS", "BatchNorm", "Normalization", "Step", "for_config"]

KINDS: dict[Kind, type[Normalization]] = {Kind.BATCH_NORM: BatchNorm}


def for_config(config: SessionConfig) -> Normalization:
    return KINDS[config.kind](config)
