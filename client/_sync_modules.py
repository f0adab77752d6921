"""``RemoteSyncBatchNorm1d/2d/3d``: ``torch.nn.SyncBatchNorm`` whose collectives are a server's.

K processes (ranks 0..K-1), each constructing the module with the same ``session_id``, its own
``rank`` and the group size ``world_size``, share one synchronized session. Each training forward
is one step: the server merges the K batches' statistics and every rank's batch is normalized
with the global ones; the running statistics move once per step. The backward pools the per-channel
sums of dy and dy * x_hat through ``SyncReduce``, so the K ranks together get the outputs, running
statistics and gradients of one ``torch.nn.BatchNorm`` over the concatenated batch (weight and
bias gradients are each rank's share: summed over ranks, as DDP's all-reduce does, they are the
reference's).

The ranks may reach one server, or different replicas sharing a Redis store (they meet in
Redis); a rank's batch larger than the client's ``chunk_bytes`` is streamed in chunks and joins
its step all the same.

Every rank must run the same number of training forwards (and backwards) in the same order: the
module counts its steps (``sync_step``); a rank that falls behind makes the step fail for all at
the group's timeout (ABORTED). Eval forwards use the running statistics, unsynchronized. A deep
copy forks the statistics into a session of its own, not synchronized (an EMA or SWA copy is
evaluated, not trained in step). The rest (attach, pickle, ``torch.save``) is RemoteBatchNorm's.
"""

from __future__ import annotations

from typing import Any

import torch

from normserve.client._modules import _RemoteBatchNorm

__all__ = ["RemoteSyncBatchNorm1d", "RemoteSyncBatchNorm2d", "RemoteSyncBatchNorm3d"]


class _SyncNormalize(torch.autograd.Function):
    """x -> x_hat with the group's statistics; backward with the group's reductions."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: _RemoteSyncBatchNorm, step: int) -> torch.Tensor:  # type: ignore[override]
        sync = (module.rank, step)
        result = module.client.normalize(module.session_id, x, mode="train", sync=sync)
        x_hat = result.output
        invstd = torch.rsqrt(result.var.to(x.device) + module.eps)
        ctx.save_for_backward(x_hat, invstd)
        ctx.module, ctx.sync = module, sync
        return x_hat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        x_hat, invstd = ctx.saved_tensors
        dtype = grad.dtype
        g, xh = grad.float(), x_hat.float()
        dims = [0, *range(2, g.dim())]
        count = g.numel() // g.shape[1] if g.numel() else 0
        module: _RemoteSyncBatchNorm = ctx.module
        red = module.client.sync_reduce(
            module.session_id, ctx.sync, g.sum(dim=dims), (g * xh).sum(dim=dims), count
        )
        shape = [1, -1] + [1] * (g.dim() - 2)
        n = red.count
        mean_g = (red.sum_dy.to(g.device) / n).view(shape)
        mean_gx = (red.sum_dy_xhat.to(g.device) / n).view(shape)
        dx = invstd.view(shape) * (g - mean_g - xh * mean_gx)
        return dx.to(dtype), None, None


class _RemoteSyncBatchNorm(_RemoteBatchNorm):
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
        rank: int,
        world_size: int,
        sync_timeout: float = 30.0,
        **remote: Any,
    ) -> None:
        """torch's arguments; ``rank`` in [0, ``world_size``), ``world_size`` the group's K >= 2,
        ``sync_timeout`` the seconds a step waits for its last rank (for a session this module
        creates; attaching checks it matches); then RemoteBatchNorm's (``client``,
        ``session_id``: give every rank the same one, ...)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.rank, self.world_size, self.sync_timeout = rank, world_size, float(sync_timeout)
        #: the next training step's number: every rank counts the same
        self.sync_step = 0
        self._forked = False
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **remote
        )

    def _kind_options(self) -> dict[str, Any]:
        if self._forked:
            return {}
        return {"sync_participants": self.world_size, "sync_timeout": self.sync_timeout}

    def __deepcopy__(self, memo: dict[int, Any]) -> _RemoteSyncBatchNorm:
        forked = self._forked
        self._forked = True  # the copy's session is created unsynchronized
        try:
            new = super().__deepcopy__(memo)
        finally:
            self._forked = forked
        assert isinstance(new, _RemoteSyncBatchNorm)
        new._forked = True
        return new

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self._forked:
            return super()._normalize(x)
        step = self.sync_step
        self.sync_step += 1
        x_hat: torch.Tensor = _SyncNormalize.apply(x, self, step)
        return x_hat

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, world_size={self.world_size}"


class RemoteSyncBatchNorm1d(_RemoteSyncBatchNorm):
    """``torch.nn.BatchNorm1d`` over ``[N, C]`` or ``[N, C, L]``, synchronized over K ranks."""

    _ranks = (2, 3)


class RemoteSyncBatchNorm2d(_RemoteSyncBatchNorm):
    """``torch.nn.BatchNorm2d`` over ``[N, C, H, W]``, synchronized over K ranks."""

    _ranks = (4,)


class RemoteSyncBatchNorm3d(_RemoteSyncBatchNorm):
    """``torch.nn.BatchNorm3d`` over ``[N, C, D, H, W]``, synchronized over K ranks."""

    _ranks = (5,)
