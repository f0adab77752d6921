"""``RemoteBatchRenorm1d/2d/3d``, ``RemoteGhostBatchNorm1d/2d/3d`` and
``RemoteRecurrentBatchNorm1d``: batch renormalization, ghost batch norm and recurrent batch norm as
torch modules whose statistics live in a server session.

They are ``RemoteBatchNorm*d`` in every other way (attaching to sessions, copies, pickling,
``state_dict``); only the session's kind and the backward differ. The server returns x_hat and
the statistics it was normalized with (``(x - mean) / sqrt(var + eps)``); the input gradient is
computed locally in closed form: per virtual batch for ghost batch norm, and for batch renorm
with r and d held constant, as the paper prescribes:
dx = r / sigma_B * (g - mean(g) - x_hat_B * mean(g * x_hat_B)), x_hat_B = (x - mu_B) / sigma_B,
where r / sigma_B = 1 / sqrt(var + eps) of the answer's var.
"""

from __future__ import annotations

from typing import Any, Unpack

import torch

from normserve.client._common import RenormLimits
from normserve.client._modules import RemoteOptions, _batch_backward, _RemoteBatchNorm

__all__ = [
    "RemoteBatchRenorm1d",
    "RemoteBatchRenorm2d",
    "RemoteBatchRenorm3d",
    "RemoteGhostBatchNorm1d",
    "RemoteGhostBatchNorm2d",
    "RemoteGhostBatchNorm3d",
    "RemoteRecurrentBatchNorm1d",
]


class _RemoteBatchRenorm(_RemoteBatchNorm):
    _kind = "batch_renorm"
    _backward_needs_input = True  # x_hat_B, from x itself

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        rmax: float = 3.0,
        dmax: float = 5.0,
        rmax_warmup_steps: int = 0,
        dmax_warmup_steps: int = 0,
        **connection: Unpack[RemoteOptions],
    ) -> None:
        """Batch norm's arguments (running statistics always tracked), then batch renorm's
        limits and their warm-ups in TRAIN batches (``RenormLimits``), then
        ``RemoteBatchNorm*d``'s ``client``, ``session_id``, ... ."""
        self.renorm = RenormLimits(rmax, dmax, rmax_warmup_steps, dmax_warmup_steps)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **connection)

    def _kind_options(self) -> dict[str, Any]:
        return {"renorm": self.renorm}

    def _train_backward(
        self, g: torch.Tensor, x: torch.Tensor | None, xh: torch.Tensor, invstd: torch.Tensor
    ) -> torch.Tensor:
        # x_hat_B from x itself: the answer's x_hat is x_hat_B * r + d
        assert x is not None
        x64 = x.double()
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x64, dim=dims, correction=0, keepdim=True)
        xhb = ((x64 - mean) * torch.rsqrt(var + self.eps)).float()
        return _batch_backward(g, xhb, invstd)

    def extra_repr(self) -> str:
        r = self.renorm
        return (
            f"{super().extra_repr()}, rmax={r.rmax}, dmax={r.dmax}, "
            f"rmax_warmup_steps={r.rmax_warmup_steps}, dmax_warmup_steps={r.dmax_warmup_steps}"
        )


class _RemoteGhostBatchNorm(_RemoteBatchNorm):
    _kind = "ghost_batch_norm"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        ghost_batch_size: int,
        **connection: Unpack[RemoteOptions],
    ) -> None:
        """Batch norm's arguments, then the size of the virtual batches a TRAIN batch is split
        into along dim 0, then ``RemoteBatchNorm*d``'s ``client``, ``session_id``, ... ."""
        self.ghost_batch_size = ghost_batch_size
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **connection
        )

    def _kind_options(self) -> dict[str, Any]:
        return {"ghost_batch_size": self.ghost_batch_size}

    def _train_backward(
        self, g: torch.Tensor, x: torch.Tensor | None, xh: torch.Tensor, invstd: torch.Tensor
    ) -> torch.Tensor:
        if invstd.dim() == 1:  # EVAL without running statistics: the whole batch's
            return _batch_backward(g, xh, invstd)
        size = self.ghost_batch_size
        parts = zip(g.split(size), xh.split(size), invstd, strict=True)
        return torch.cat([_batch_backward(gp, xp, inv) for gp, xp, inv in parts])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class RemoteRecurrentBatchNorm1d(_RemoteBatchNorm):
    """Recurrent batch norm (Cooijmans et al. 2016) over ``[N, C]`` or ``[N, C, L]``: a slot of
    running statistics per time step on a server (``time_steps`` of them; later steps share the
    last), weight and bias shared across steps. ``forward(x, t)`` names the step."""

    _kind = "recurrent_batch_norm"
    _ranks = (2, 3)

    def __init__(
        self,
        num_features: int,
        time_steps: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **connection: Unpack[RemoteOptions],
    ) -> None:
        """Batch norm's arguments with ``time_steps`` after ``num_features`` (momentum must be
        a number: one num_batches_tracked serves every slot), then ``RemoteBatchNorm*d``'s
        ``client``, ``session_id``, ... . running_mean and running_var are [time_steps, C]."""
        self.time_steps = time_steps
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **connection
        )

    def _kind_options(self) -> dict[str, Any]:
        return {"time_steps": self.time_steps}

    #: the time step the next call names (set by forward)
    _time_step = 0

    def forward(self, x: torch.Tensor, time_step: int = 0) -> torch.Tensor:  # type: ignore[override]
        if time_step < 0:
            raise ValueError(f"time_step must be >= 0, got {time_step}")
        self._time_step = int(time_step)
        return super().forward(x)

    def _normalize_options(self) -> dict[str, Any]:
        return {"time_step": self._time_step}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, time_steps={self.time_steps}"


class RemoteBatchRenorm1d(_RemoteBatchRenorm):
    """Batch renormalization over ``[N, C]`` or ``[N, C, L]``, statistics on a server."""

    _ranks = (2, 3)


class RemoteBatchRenorm2d(_RemoteBatchRenorm):
    """Batch renormalization over ``[N, C, H, W]``, statistics on a server."""

    _ranks = (4,)


class RemoteBatchRenorm3d(_RemoteBatchRenorm):
    """Batch renormalization over ``[N, C, D, H, W]``, statistics on a server."""

    _ranks = (5,)


class RemoteGhostBatchNorm1d(_RemoteGhostBatchNorm):
    """Ghost batch norm over ``[N, C]`` or ``[N, C, L]``, statistics on a server."""

    _ranks = (2, 3)


class RemoteGhostBatchNorm2d(_RemoteGhostBatchNorm):
    """Ghost batch norm over ``[N, C, H, W]``, statistics on a server."""

    _ranks = (4,)


class RemoteGhostBatchNorm3d(_RemoteGhostBatchNorm):
    """Ghost batch norm over ``[N, C, D, H, W]``, statistics on a server."""

    _ranks = (5,)
