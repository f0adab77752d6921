"""Batch norm (torch.nn.BatchNorm1d/2d/3d): per-channel statistics over all dims but dim 1."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from normserve.server import ops
from normserve.server.service._config import Mode
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import FLOAT_DTYPES, Normalization, Step, describe

__all__ = ["FLOAT_DTYPES", "BatchNorm", "describe"]


class BatchNorm(Normalization):
    """Outputs, running statistics and gradients as torch.nn.BatchNorm computes them."""

    def state_keys(self) -> list[str]:
        keys = []
        if self.config.affine:
            keys += ["weight", "bias"]
        if self.config.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def _filled(self, value: float, device: torch.device) -> torch.Tensor:
        return torch.full((self.config.num_features,), value, dtype=torch.float32, device=device)

    def initial(self, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.config.track_running_stats:
            return {}
        return {"running_mean": self._filled(0.0, device), "running_var": self._filled(1.0, device)}

    def initial_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {"weight": self._filled(1.0, device), "bias": self._filled(0.0, device)}

    def check_input(self, x: torch.Tensor, field: str) -> None:
        self.check_dtype(x, field)
        if not 2 <= x.dim() <= 5:
            raise InvalidArgument(
                f"{field}.shape",
                f"expected rank 2 to 5 ([N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]), "
                f"got rank {x.dim()} {describe(x.shape)}",
            )
        c = self.config.num_features
        if x.shape[1] != c:
            raise InvalidArgument(
                f"{field}.shape[1]", f"expected {c} channels (num_features), got {x.shape[1]}"
            )

    def uses_batch_statistics(self, mode: Mode) -> bool:
        return mode is Mode.TRAIN or not self.config.track_running_stats

    @staticmethod
    def _check_count(count: int, field: str, shape: Sequence[int]) -> None:
        # torch's rule: one value per channel has no variance. Zero values is an empty batch,
        # which torch also accepts (empty output, running statistics unchanged).
        if count == 1:
            raise InvalidArgument(
                f"{field}.shape",
                "batch statistics need more than 1 value per channel, "
                f"got input size {describe(shape)}",
            )

    def _running(
        self, state: SessionState, mean: torch.Tensor, var: torch.Tensor, count: int, n: int
    ) -> dict[str, torch.Tensor]:
        rm, rv = state.running_mean, state.running_var
        assert rm is not None and rv is not None
        if count == 0:  # an empty batch: counted, as torch counts it, and nothing else
            return {"running_mean": rm, "running_var": rv}
        factor = ops.ema_factor(self.config.momentum, n)
        new_mean, new_var = ops.update_running(rm, rv, mean, var, count, factor)
        return {"running_mean": new_mean, "running_var": new_var}

    def _nan(self, device: torch.device) -> torch.Tensor:
        return self._filled(float("nan"), device)

    def forward(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool, n: int
    ) -> Step:
        cfg = self.config
        w, b = state.weight, state.bias
        if not self.uses_batch_statistics(mode):
            mean, var = state.running_mean, state.running_var
            assert mean is not None and var is not None
            out = None if statistics_only else ops.normalize(x, mean, var, w, b, self.eps)
            return Step(out, mean, var)
        count = x.numel() // x.shape[1]
        self._check_count(count, "input", x.shape)
        train = self.updates_running(mode)
        if statistics_only:
            if count == 0:
                mean, var = self._nan(x.device), self._nan(x.device)
            else:
                m = ops.moments(x)
                mean, var = m.mean, m.var
            running = self._running(state, mean, var, count, n) if train else None
            return Step(None, mean, var, running)
        if train:
            rm, rv = state.running_mean, state.running_var
            assert rm is not None and rv is not None
            factor = ops.ema_factor(cfg.momentum, n)
            out, mean, var, new = ops.batch_norm_train(x, w, b, self.eps, (rm, rv), factor)
            assert new is not None
            return Step(out, mean, var, {"running_mean": new[0], "running_var": new[1]})
        out, mean, var, _ = ops.batch_norm_train(x, w, b, self.eps)
        return Step(out, mean, var)

    def prepare_update(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool
    ) -> Callable[[SessionState, int], Step] | None:
        # batch norm's output and statistics are the batch's own: only the running update
        # follows the state. Its variants fold in otherwise (renorm's output reads the running
        # statistics, ghost batch norm updates once per virtual batch, recurrent a slot).
        if type(self) is not BatchNorm or not self.updates_running(mode):
            return None
        count = x.numel() // x.shape[1]
        self._check_count(count, "input", x.shape)
        w, b = state.weight, state.bias
        if statistics_only:
            if count == 0:
                out, mean, var = None, self._nan(x.device), self._nan(x.device)
            else:
                m = ops.moments(x)
                out, mean, var = None, m.mean, m.var
        else:
            out, mean, var, _ = ops.batch_norm_train(x, w, b, self.eps)

        def fold(s: SessionState, n: int) -> Step:
            if s.weight is not w or s.bias is not b:  # imported meanwhile: compute it again
                return self.forward(x, s, mode, statistics_only, n)
            return Step(out, mean, var, self._running(s, mean, var, count, n))

        return fold

    def chunk_statistics(self, x: torch.Tensor, partial: Any) -> Any:
        if x.numel() == 0:
            return partial
        m = ops.moments(x)
        return m if partial is None else ops.merge_moments(partial, m)

    def finish(
        self, partial: Any, shape: list[int], state: SessionState, mode: Mode, n: int
    ) -> tuple[Step, Any]:
        m: ops.Moments | None = partial
        count = m.count if m is not None else 0
        self._check_count(count, "chunk", shape)
        if m is None:
            mean, var = self._nan(torch.device("cpu")), self._nan(torch.device("cpu"))
        else:
            mean, var = m.mean, m.var
        running = self._running(state, mean, var, count, n) if self.updates_running(mode) else None
        prepared = None if m is None else (m, ops.batch_shift(m))
        return Step(None, mean, var, running), prepared

    def normalize_chunk(self, x: torch.Tensor, prepared: Any, state: SessionState) -> torch.Tensor:
        eps, w, b = self.eps, state.weight, state.bias
        if prepared is None:
            if x.numel() == 0 or state.running_mean is None:
                return torch.empty_like(x)  # an empty batch: nothing to normalize
            assert state.running_var is not None
            return ops.normalize(x, state.running_mean, state.running_var, w, b, eps)
        m, shift = prepared
        return ops.normalize_batch(x, m, w, b, eps, shift)
