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

from typing import Any

import torch

from normserve.client._common import RenormLimits
from normserve.client._modules import _RemoteBatchNorm

__all__ = [
    "RemoteBatchRenorm1d",
    "RemoteBatchRenorm2d",
    "RemoteBatchRenorm3d",
    "RemoteGhostBatchNorm1d",
    "RemoteGhostBatchNorm2d",
    "RemoteGhostBatchNorm3d",
    "RemoteRecurrentBatchNorm1d",
]


def _shape(g: torch.Tensor) -> list[int]:
    return [1, -1] + [1] * (g.dim() - 2)


def _batch_backward(g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """Batch norm's input gradient through x_hat = (x - mean) * invstd, per channel."""
    dims = [0, *range(2, g.dim())]
    mean_g = g.mean(dim=dims, keepdim=True)
    mean_gx = (g * xh).mean(dim=dims, keepdim=True)
    return invstd.view(_shape(g)) * (g - mean_g - xh * mean_gx)


class _Normalize(torch.autograd.Function):
    """x -> x_hat through the server; backward is the variant's (``_train_backward``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: _BatchVariant, mode: str) -> torch.Tensor:  # type: ignore[override]
        result = module.client.normalize(
            module.session_id,
            x,
            mode=mode,  # type: ignore[arg-type]
            time_step=module._time_step,
        )
        invstd = torch.rsqrt(result.var.to(x.device) + module.eps)
        ctx.save_for_backward(x, result.output, invstd)
        ctx.module = module
        ctx.batch_statistics = result.batch_statistics
        return result.output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        x, x_hat, invstd = ctx.saved_tensors
        g = grad.float()
        if not ctx.batch_statistics:
            dx = g * invstd.float().view(_shape(g))
        else:
            dx = ctx.module._train_backward(g, x, x_hat.float(), invstd.float())
        return dx.to(grad.dtype), None, None


class _BatchVariant(_RemoteBatchNorm):
    #: the time step the next call names (recurrent batch norm's forward sets it)
    _time_step = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        self._ensure_session()
        x_hat = _Normalize.apply(x, self, "train" if self.training else "eval")
        if self.weight is None:
            return x_hat  # type: ignore[no-any-return]
        shape = _shape(x)
        y = x_hat * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)  # type: ignore[no-any-return]

    def _train_backward(
        self, g: torch.Tensor, x: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class _RemoteBatchRenorm(_BatchVariant):
    _kind = "batch_renorm"

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
        **connection: Any,
    ) -> None:
        """Batch norm's arguments (running statistics always tracked), then batch renorm's
        limits and their warm-ups in TRAIN batches (``RenormLimits``), then
        ``RemoteBatchNorm*d``'s ``client``, ``session_id``, ... ."""
        self.renorm = RenormLimits(rmax, dmax, rmax_warmup_steps, dmax_warmup_steps)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **connection)

    def _kind_options(self) -> dict[str, Any]:
        return {"renorm": self.renorm}

    def _train_backward(
        self, g: torch.Tensor, x: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor
    ) -> torch.Tensor:
        # x_hat_B from x itself: the answer's x_hat is x_hat_B * r + d
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


class _RemoteGhostBatchNorm(_BatchVariant):
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
        **connection: Any,
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
        self, g: torch.Tensor, x: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor
    ) -> torch.Tensor:
        if invstd.dim() == 1:  # EVAL without running statistics: the whole batch's
            return _batch_backward(g, xh, invstd)
        size = self.ghost_batch_size
        parts = zip(g.split(size), xh.split(size), invstd, strict=True)
        return torch.cat([_batch_backward(gp, xp, inv) for gp, xp, inv in parts])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ghost_batch_size={self.ghost_batch_size}"


class RemoteRecurrentBatchNorm1d(_BatchVariant):
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
        **connection: Any,
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

    def forward(self, x: torch.Tensor, time_step: int = 0) -> torch.Tensor:  # type: ignore[override]
        if time_step < 0:
            raise ValueError(f"time_step must be >= 0, got {time_step}")
        self._time_step = int(time_step)
        return super().forward(x)

    def _train_backward(
        self, g: torch.Tensor, x: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor
    ) -> torch.Tensor:
        return _batch_backward(g, xh, invstd)

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
