"""Ghost batch norm: a TRAIN batch normalized in virtual batches of ``ghost_batch_size`` samples
along dim 0, each with its own statistics, the running statistics updated once per virtual batch
in order; EVAL as batch norm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from normserve.server import ops
from normserve.server.service._config import Mode
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import Step, describe
from normserve.server.service.kinds._batch_norm import BatchNorm

__all__ = ["GhostBatchNorm"]


@dataclass
class _Virtual:
    """A streamed batch's virtual batches so far: their moments, and how many rows came."""

    rows: int = 0
    moments: list[ops.Moments] = field(default_factory=list)


@dataclass
class _Cursor:
    """What a streamed TRAIN batch's chunks are normalized with, and where the next chunk begins."""

    moments: list[tuple[ops.Moments, torch.Tensor | None]]
    row: int = 0


class GhostBatchNorm(BatchNorm):
    """Batch norm's state and EVAL; in TRAIN, ``F.batch_norm`` over ``input.split(G)`` in order."""

    @property
    def size(self) -> int:
        return self.config.ghost_batch_size

    def statistics_numel(self, shape: Sequence[int]) -> int:
        return max(1, math.ceil(shape[0] / self.size)) * self.config.num_features

    def _check_virtual(self, counts: Sequence[int], shape: Sequence[int], field: str) -> None:
        for i, count in enumerate(counts):
            if count == 1:
                raise InvalidArgument(
                    f"{field}.shape",
                    f"virtual batch {i} (of ghost_batch_size {self.size}) has 1 value per "
                    f"channel; batch statistics need more, got input size {describe(shape)}",
                )

    def _update(
        self, state: SessionState, moments: Sequence[ops.Moments], n: int
    ) -> dict[str, torch.Tensor]:
        rm, rv = state.running_mean, state.running_var
        assert rm is not None and rv is not None
        for i, m in enumerate(moments):  # n - 1 batches before this call; virtual batch i is n + i
            factor = ops.ema_factor(self.config.momentum, n + i)
            rm, rv = ops.update_running(rm, rv, m.mean, m.var, m.count, factor)
        return {"running_mean": rm, "running_var": rv}

    def _step(
        self,
        moments: Sequence[ops.Moments],
        out: torch.Tensor | None,
        state: SessionState,
        mode: Mode,
        n: int,
    ) -> Step:
        c = self.config.num_features
        if moments:
            mean = torch.stack([m.mean for m in moments]).float()
            var = torch.stack([m.var for m in moments]).float()
        else:
            mean = var = torch.empty(0, c)
        if not self.updates_running(mode):
            return Step(out, mean, var)
        return Step(out, mean, var, self._update(state, moments, n), batches=len(moments))

    def forward(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool, n: int
    ) -> Step:
        if mode is not Mode.TRAIN:
            return super().forward(x, state, mode, statistics_only, n)
        pieces = list(x.split(self.size)) if x.numel() else []
        per = x[0:1].numel() // x.shape[1] if x.shape[0] else 0
        self._check_virtual([p.shape[0] * per for p in pieces], x.shape, "input")
        moments = [ops.moments(p) for p in pieces]
        out = None
        if not statistics_only:
            w, b, eps = state.weight, state.bias, self.eps
            outs = [
                ops.normalize_batch(p, m, w, b, eps, ops.batch_shift(m))
                for p, m in zip(pieces, moments, strict=True)
            ]
            out = torch.cat(outs) if outs else torch.empty_like(x)
        return self._step(moments, out, state, mode, n)

    def chunk_statistics(self, x: torch.Tensor, partial: Any) -> Any:
        v: _Virtual = partial if partial is not None else _Virtual()
        if x.numel() == 0:
            return partial
        moments = list(v.moments)
        for offset, length, begins in ops.ghost_splits(v.rows, x.shape[0], self.size):
            m = ops.moments(x[offset : offset + length])
            if begins:
                moments.append(m)
            else:  # the virtual batch the previous chunk began
                moments[-1] = ops.merge_moments(moments[-1], m)
        return _Virtual(v.rows + x.shape[0], moments)

    def finish(
        self, partial: Any, shape: list[int], state: SessionState, mode: Mode, n: int
    ) -> tuple[Step, Any]:
        v: _Virtual | None = partial
        if mode is not Mode.TRAIN:
            whole = None
            for m in v.moments if v is not None else []:
                whole = m if whole is None else ops.merge_moments(whole, m)
            return super().finish(whole, shape, state, mode, n)
        moments = v.moments if v is not None else []
        self._check_virtual([m.count for m in moments], shape, "chunk")
        step = self._step(moments, None, state, mode, n)
        return step, _Cursor([(m, ops.batch_shift(m)) for m in moments])

    def normalize_chunk(self, x: torch.Tensor, prepared: Any, state: SessionState) -> torch.Tensor:
        if not isinstance(prepared, _Cursor):
            return super().normalize_chunk(x, prepared, state)
        if x.numel() == 0:
            return torch.empty_like(x)
        outs = []
        for offset, length, _ in ops.ghost_splits(prepared.row, x.shape[0], self.size):
            m, shift = prepared.moments[(prepared.row + offset) // self.size]
            piece = x[offset : offset + length]
            outs.append(ops.normalize_batch(piece, m, state.weight, state.bias, self.eps, shift))
        prepared.row += x.shape[0]
        return torch.cat(outs)
