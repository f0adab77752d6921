"""Group norm (torch.nn.GroupNorm): each sample's channels in ``num_groups`` groups, each group
normalized over its channels and spatial dims."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from normserve.server import ops
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import describe
from normserve.server.service.kinds._per_sample import PerSample

__all__ = ["GroupNorm", "check_channels"]


def check_channels(x: torch.Tensor, c: int, field: str) -> None:
    if x.shape[1] != c:
        raise InvalidArgument(
            f"{field}.shape[1]", f"expected {c} channels (num_features), got {x.shape[1]}"
        )


class GroupNorm(PerSample):
    """Outputs and statistics as torch.nn.GroupNorm computes them."""

    def statistics_shape(self, shape: Sequence[int]) -> list[int]:
        return [shape[0], self.config.num_groups]

    def state_keys(self) -> list[str]:
        return ["weight", "bias"] if self.config.affine else []

    def initial(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def initial_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        c = self.config.num_features
        return {
            "weight": torch.ones(c, dtype=torch.float32, device=device),
            "bias": torch.zeros(c, dtype=torch.float32, device=device),
        }

    def check_input(self, x: torch.Tensor, field: str) -> None:
        self.check_dtype(x, field)
        if x.dim() < 2:
            raise InvalidArgument(
                f"{field}.shape",
                f"expected rank 2 or more ([N, C, *]), got rank {x.dim()} {describe(x.shape)}",
            )
        check_channels(x, self.config.num_features, field)

    def check_batch(self, shape: Sequence[int], field: str) -> None:
        # torch's rule (F.group_norm): the batch, seen as batch-norm input [N * C / G, G, *],
        # must hold more than one value per channel
        per_group = self.config.num_features // self.config.num_groups
        if shape[0] * per_group * math.prod(shape[2:]) == 1:
            raise InvalidArgument(
                f"{field}.shape",
                "expected more than 1 value per group across the batch (torch's rule), got "
                f"input size {describe(shape)}",
            )

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.group_norm_moments(x, self.config.num_groups)

    def apply(self, x: torch.Tensor, state: SessionState) -> torch.Tensor:
        return ops.group_norm(x, self.config.num_groups, state.weight, state.bias, self.eps)
