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
    """What a TRAIN batch is normalized with: its moments (and pivot), r and d."""

    def __init__(self, m: ops.Moments, r: torch.Tensor, d: torch.Tensor) -> None:
        self.m, self.shift, self.r, self.d = m, ops.batch_shift(m), r, d


class BatchRenorm(BatchNorm):
    """Batch norm's state and EVAL; TRAIN outputs the paper's ``(x - mu_B) / sigma_B * r + d``
    (``ops.renorm_apply``), answers the statistics that make it ``(x - mean) / sqrt(var + eps)``
    (``ops.renorm_statistics``), and updates the running statistics as batch norm does. The
    config always tracks running statistics."""

    def _renormed(
        self, m: ops.Moments, state: SessionState, n: int
    ) -> tuple[_Renormed, torch.Tensor, torch.Tensor]:
        rm, rv = state.running_mean, state.running_var
        assert rm is not None and rv is not None
        rmax, dmax = self.config.renorm_limits(n)
        r, d = ops.renorm_factors(m.mean, m.var, rm, rv, self.eps, rmax, dmax)
        mean, var = ops.renorm_statistics(m.mean, m.var, r, d, self.eps)
        return _Renormed(m, r, d), mean.float(), var.float()

    def _apply(self, x: torch.Tensor, p: _Renormed, state: SessionState) -> torch.Tensor:
        return ops.renorm_apply(x, p.m, p.shift, p.r, p.d, state.weight, state.bias, self.eps)

    def forward(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool, n: int
    ) -> Step:
        count = x.numel() // x.shape[1] if x.dim() > 1 else 0
        if not self.updates_running(mode) or count == 0:
            return super().forward(x, state, mode, statistics_only, n)
        self._check_count(count, "input", x.shape)
        m = ops.moments(x)
        prepared, mean, var = self._renormed(m, state, n)
        out = None if statistics_only else self._apply(x, prepared, state)
        running = self._running(state, m.mean, m.var, count, n)
        return Step(out, mean, var, running)

    def finish(
        self, partial: Any, shape: list[int], state: SessionState, mode: Mode, n: int
    ) -> tuple[Step, Any]:
        step, prepared = super().finish(partial, shape, state, mode, n)
        if prepared is None or not self.updates_running(mode):
            return step, prepared
        renormed, mean, var = self._renormed(prepared[0], state, n)
        return Step(None, mean, var, step.running), renormed

    def normalize_chunk(self, x: torch.Tensor, prepared: Any, state: SessionState) -> torch.Tensor:
        if isinstance(prepared, _Renormed):
            if x.numel() == 0:
                return torch.empty_like(x)
            return self._apply(x, prepared, state)
        return super().normalize_chunk(x, prepared, state)
