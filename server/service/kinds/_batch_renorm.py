"""Batch renormalization (Ioffe 2017): batch norm whose TRAIN output is corrected towards the
running statistics by r and d (``ops.renorm_factors``), with rmax and dmax on a warm-up schedule
read from num_batches_tracked (``SessionConfig.renorm_limits``)."""

from __future__ import annotations

from typing import Any

import torch

from normserve.server import ops
from normserve.server.service._config import Mode
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import Step
from normserve.server.service.kinds._batch_norm import BatchNorm

__all__ = ["BatchRenorm"]


class _Renormed:
    """What a streamed TRAIN batch's chunks are normalized with: the effective statistics."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.mean, self.var = mean, var


class BatchRenorm(BatchNorm):
    """Batch norm's state and EVAL; TRAIN normalizes with the statistics that make the paper's
    ``(x - mu_B) / sigma_B * r + d`` (``ops.renorm_statistics``) and updates the running
    statistics as batch norm does. The config always tracks running statistics."""

    def _effective(
        self, m: ops.Moments, state: SessionState, n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rm, rv = state.running_mean, state.running_var
        assert rm is not None and rv is not None
        rmax, dmax = self.config.renorm_limits(n)
        r, d = ops.renorm_factors(m.mean, m.var, rm, rv, self.eps, rmax, dmax)
        return ops.renorm_statistics(m.mean, m.var, r, d, self.eps)

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, state: Any) -> Any:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ops.normalize(x, mean.to(dtype), var.to(dtype), state.weight, state.bias, self.eps)

    def forward(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool, n: int
    ) -> Step:
        count = x.numel() // x.shape[1] if x.dim() > 1 else 0
        if not self.updates_running(mode) or count == 0:
            return super().forward(x, state, mode, statistics_only, n)
        self._check_count(count, "input", x.shape)
        m = ops.moments(x)
        mean, var = self._effective(m, state, n)
        out = None if statistics_only else self._normalize(x, mean, var, state)
        running = self._running(state, m.mean, m.var, count, n)
        return Step(out, mean.float(), var.float(), running)

    def finish(
        self, partial: Any, shape: list[int], state: SessionState, mode: Mode, n: int
    ) -> tuple[Step, Any]:
        step, prepared = super().finish(partial, shape, state, mode, n)
        if prepared is None or not self.updates_running(mode):
            return step, prepared
        mean, var = self._effective(prepared[0], state, n)
        return Step(None, mean.float(), var.float(), step.running), _Renormed(mean, var)

    def normalize_chunk(self, x: torch.Tensor, prepared: Any, state: SessionState) -> torch.Tensor:
        if isinstance(prepared, _Renormed):
            return self._normalize(x, prepared.mean, prepared.var, state)
        return super().normalize_chunk(x, prepared, state)
