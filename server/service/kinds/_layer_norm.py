"""Layer norm (torch.nn.LayerNorm) and RMS norm (torch.nn.RMSNorm): each sample normalized over
its trailing dims, ``normalized_shape``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from normserve.server import ops
from normserve.server.service._config import Kind
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import describe
from normserve.server.service.kinds._per_sample import PerSample

__all__ = ["LayerNorm", "RMSNorm"]


class _Trailing(PerSample):
    """What layer and RMS norm share: the input's rules, the statistics' shape, the kept shapes."""

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self.config.normalized_shape

    def statistics_shape(self, shape: Sequence[int]) -> list[int]:
        return list(shape[: len(shape) - len(self.config.normalized_shape)])

    def state_keys(self) -> list[str]:
        if not self.config.affine:
            return []
        return ["weight", "bias"] if self._has_bias else ["weight"]

    @property
    def _has_bias(self) -> bool:
        return self.config.kind is Kind.LAYER_NORM and self.config.bias is not False

    def initial(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {}

    def initial_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        shape = self.config.normalized_shape
        params = {"weight": torch.ones(shape, dtype=torch.float32, device=device)}
        if self._has_bias:
            params["bias"] = torch.zeros(shape, dtype=torch.float32, device=device)
        return params

    def check_input(self, x: torch.Tensor, field: str) -> None:
        self.check_dtype(x, field)
        shape = self.config.normalized_shape
        k = len(shape)
        if x.dim() <= k:
            raise InvalidArgument(
                f"{field}.shape",
                f"expected [N, ..., {', '.join(str(d) for d in shape)}]: a batch dim, then the "
                f"normalized dims {describe(shape)}; got rank {x.dim()} {describe(x.shape)}",
            )
        if tuple(x.shape[-k:]) != shape:
            raise InvalidArgument(
                f"{field}.shape",
                f"the last {k} dim(s) must be normalized_shape {describe(shape)}, got "
                f"{describe(x.shape)}",
            )


class LayerNorm(_Trailing):
    """Outputs and statistics as torch.nn.LayerNorm computes them."""

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.layer_norm_moments(x, len(self.config.normalized_shape))

    def apply(self, x: torch.Tensor, state: SessionState) -> torch.Tensor:
        return ops.layer_norm(x, self.config.normalized_shape, state.weight, state.bias, self.eps)


class RMSNorm(_Trailing):
    """Outputs as torch.nn.RMSNorm computes them; statistics: mean zeros, var the mean square."""

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ms = ops.mean_square(x, len(self.config.normalized_shape))
        return torch.zeros_like(ms), ms

    def apply(self, x: torch.Tensor, state: SessionState) -> torch.Tensor:
        return ops.rms_norm(x, self.config.normalized_shape, state.weight, self.config.eps)
