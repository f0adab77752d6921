"""``RemoteLayerNorm``, ``RemoteGroupNorm``, ``RemoteInstanceNorm1d/2d/3d``, ``RemoteRMSNorm``:
drop-in torch normalization modules whose normalization runs in a server session.

Each takes its torch module's arguments, then ``RemoteBatchNorm*d``'s ``client``, ``session_id``,
``if_exists``, ... (``RemoteOptions``), and is one in every other way (attaching to sessions,
copies, pickling, ``state_dict``): only the session's kind, the inputs and the backward differ.
The server returns x_hat = (x - mean) / sqrt(var + eps) (x / sqrt(mean(x^2) + eps) for RMS norm)
and the statistics it used; the gradient with respect to the input is computed locally from x_hat
and those statistics by the kind's closed-form backward. Running statistics (instance norm with
``track_running_stats``) live in the session and appear in ``state_dict``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Unpack

import torch
from torch import Tensor

from normserve.client._modules import RemoteOptions, _channels, _NormBase, _RemoteNorm

__all__ = [
    "RemoteGroupNorm",
    "RemoteInstanceNorm1d",
    "RemoteInstanceNorm2d",
    "RemoteInstanceNorm3d",
    "RemoteLayerNorm",
    "RemoteRMSNorm",
]


def _rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    """The eps RMS norm adds for inputs of ``dtype``: torch's eps=None is the machine epsilon of
    the dtype its kernel computes in (float64 for float64 inputs, float32 for the others)."""
    if eps is not None:
        return eps
    return float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)


def _groupwise_backward(
    g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor, dims: Sequence[int], center: bool
) -> torch.Tensor:
    """The gradient through x_hat = (x - mean) * invstd with mean and invstd taken over ``dims``
    (``invstd`` shaped to broadcast): invstd * (g - mean(g) - x_hat * mean(g * x_hat)); without
    ``center`` (RMS norm: no mean subtracted), invstd * (g - x_hat * mean(g * x_hat))."""
    mean_gx = (g * xh).mean(dim=list(dims), keepdim=True)
    inner = g - xh * mean_gx
    if center:
        inner = inner - g.mean(dim=list(dims), keepdim=True)
    return invstd * inner


class _Trailing(_RemoteNorm):
    """Layer and RMS norm: normalized over the trailing ``normalized_shape``."""

    _center = True  # RMS norm subtracts no mean
    _repr_args = ("normalized_shape",)
    _repr_kwargs = ("eps", "elementwise_affine")

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None,
        elementwise_affine: bool,
        bias: bool,
        device: Any,
        dtype: torch.dtype | None,
        remote: RemoteOptions,
    ) -> None:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(int(d) for d in shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        super().__init__(**remote)
        weight = elementwise_affine
        self._init_params(self.normalized_shape, weight, weight and bias, device, dtype)

    def _session_config(self) -> dict[str, Any]:
        shape = self.normalized_shape
        return {"num_features": math.prod(shape), "normalized_shape": shape, "eps": self.eps}

    def _check_input(self, x: torch.Tensor) -> bool:
        return x.dim() == len(self.normalized_shape)

    def _param_view(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return p  # the trailing dims' own shape

    def _backward(
        self, g: Tensor, x: Tensor | None, xh: Tensor, invstd: Tensor, batch_statistics: bool
    ) -> Tensor:
        k = len(self.normalized_shape)
        inv = invstd.reshape(*invstd.shape, *([1] * k))
        return _groupwise_backward(g, xh, inv, range(g.dim() - k, g.dim()), self._center)


class RemoteLayerNorm(_Trailing):
    """``torch.nn.LayerNorm`` with its normalization in a server session."""

    _kind = "layer_norm"

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype, remote)


class RemoteRMSNorm(_Trailing):
    """``torch.nn.RMSNorm`` with its normalization in a server session. ``eps=None`` is torch's:
    the machine epsilon of the computation (float64 for float64 inputs, else float32)."""

    _kind = "rms_norm"
    _center = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, False, device, dtype, remote)

    def _eps_for(self, dtype: torch.dtype) -> float:
        return _rms_eps(self.eps, dtype)


class RemoteGroupNorm(_RemoteNorm):
    """``torch.nn.GroupNorm`` with its normalization in a server session."""

    _kind = "group_norm"
    _config_fields = ("num_features", "num_groups", "eps")
    _repr_args = ("num_groups", "num_channels")
    _repr_kwargs = ("eps", "affine")

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        self.num_groups = num_groups
        self.num_channels = self.num_features = num_channels
        self.eps = eps
        self.affine = affine
        super().__init__(**remote)
        self._init_params(num_channels, affine, affine, device, dtype)

    def _backward(
        self, g: Tensor, x: Tensor | None, xh: Tensor, invstd: Tensor, batch_statistics: bool
    ) -> Tensor:
        n = g.shape[0]
        grouped = (n, self.num_groups, -1)
        dx = _groupwise_backward(
            g.reshape(grouped), xh.reshape(grouped), invstd.reshape(n, -1, 1), [2], center=True
        )
        return dx.reshape(g.shape)


class _RemoteInstanceNorm(_NormBase):
    _kind = "instance_norm"
    _rank = 3  # of a batched input

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **remote
        )

    def _check_input(self, x: torch.Tensor) -> bool:
        if x.dim() not in (self._rank - 1, self._rank):
            raise ValueError(
                f"expected {self._rank - 1}D or {self._rank}D input (got {x.dim()}D input)"
            )
        return x.dim() == self._rank - 1

    def _backward(
        self, g: Tensor, x: Tensor | None, xh: Tensor, invstd: Tensor, batch_statistics: bool
    ) -> Tensor:
        if not batch_statistics:  # the running statistics: constants, [C]
            return g * invstd.view(_channels(g))
        n, c = g.shape[:2]
        flat = (n, c, -1)
        dx = _groupwise_backward(
            g.reshape(flat), xh.reshape(flat), invstd.reshape(n, c, 1), [2], center=True
        )
        return dx.reshape(g.shape)


class RemoteInstanceNorm1d(_RemoteInstanceNorm):
    """``torch.nn.InstanceNorm1d`` over ``[N, C, L]`` (or ``[C, L]``), in a server session."""

    _rank = 3


class RemoteInstanceNorm2d(_RemoteInstanceNorm):
    """``torch.nn.InstanceNorm2d`` over ``[N, C, H, W]`` (or ``[C, H, W]``), in a server session."""

    _rank = 4


class RemoteInstanceNorm3d(_RemoteInstanceNorm):
    """``torch.nn.InstanceNorm3d`` over ``[N, C, D, H, W]`` (or ``[C, D, H, W]``), in a server
    session."""

    _rank = 5
