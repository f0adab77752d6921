"""Instance norm (torch.nn.InstanceNorm1d/2d/3d): each sample's channels normalized over their
spatial dims; with running statistics, TRAIN folds in the batch's average instance and EVAL
normalizes with them."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normserve.server import ops
from normserve.server.service._config import Mode
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import describe
from normserve.server.service.kinds._group_norm import check_channels
from normserve.server.service.kinds._per_sample import PerSample

__all__ = ["InstanceNorm"]


class InstanceNorm(PerSample):
    """Outputs, statistics and running statistics as torch.nn.InstanceNorm*d computes them."""

    #: torch's InstanceNorm keeps num_batches_tracked (a _NormBase buffer) but never counts
    counts_batches = False

    # the kept state is batch norm's: the same keys, shapes and initial values

    def state_keys(self) -> list[str]:
        keys = ["weight", "bias"] if self.config.affine else []
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

    def statistics_shape(self, shape: Sequence[int]) -> list[int]:
        return [shape[0], self.config.num_features]

    def statistics_numel(self, shape: Sequence[int]) -> int:
        return max(shape[0], 1) * self.config.num_features  # EVAL's running ones: [C]

    def check_input(self, x: torch.Tensor, field: str) -> None:
        self.check_dtype(x, field)
        if not 3 <= x.dim() <= 5:
            raise InvalidArgument(
                f"{field}.shape",
                f"expected rank 3 to 5 ([N, C, L], [N, C, H, W] or [N, C, D, H, W], as "
                f"InstanceNorm1d/2d/3d), got rank {x.dim()} {describe(x.shape)}",
            )
        check_channels(x, self.config.num_features, field)

    def uses_batch_statistics(self, mode: Mode) -> bool:
        return mode is Mode.TRAIN or not self.config.track_running_stats

    def updates_running(self, mode: Mode) -> bool:
        # torch passes momentum=None on as 0: the running statistics never move
        return super().updates_running(mode) and self.config.momentum is not None

    def check_batch(self, shape: Sequence[int], field: str) -> None:
        # torch's rule (F.instance_norm with the input's statistics)
        if math.prod(shape[2:]) == 1:
            raise InvalidArgument(
                f"{field}.shape",
                "expected more than 1 spatial element per instance (torch's rule), got input "
                f"size {describe(shape)}",
            )

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.instance_norm_moments(x)

    def apply(self, x: torch.Tensor, state: SessionState) -> torch.Tensor:
        return ops.instance_norm(x, state.weight, state.bias, self.eps)

    def apply_running(self, x: torch.Tensor, state: SessionState) -> torch.Tensor:
        rm, rv = state.running_mean, state.running_var
        assert rm is not None and rv is not None
        if x.numel() == 0:
            return torch.empty_like(x)
        return ops.normalize(x, rm, rv, state.weight, state.bias, self.eps)

    def running(
        self,
        state: SessionState,
        mean: torch.Tensor | None,
        var: torch.Tensor | None,
        shape: Sequence[int],
        n: int,
    ) -> dict[str, torch.Tensor]:
        rm, rv = state.running_mean, state.running_var
        assert rm is not None and rv is not None
        if mean is None or var is None:  # no values: nothing to fold in (torch would fold NaN)
            return {"running_mean": rm, "running_var": rv}
        factor = ops.ema_factor(self.config.momentum, n)
        new_mean, new_var = ops.update_running_instances(
            rm, rv, mean, var, math.prod(shape[2:]), factor
        )
        return {"running_mean": new_mean, "running_var": new_var}
