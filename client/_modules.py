"""``RemoteBatchNorm1d/2d/3d``: drop-in ``torch.nn.BatchNorm*d`` whose statistics live on a server.

``client`` is a ``Client`` or a target; with a target, ``tls``, ``ca_file``, ``cert_file``,
``key_file`` and ``token`` secure the connection as ``Client``'s arguments of the same names do.

The running statistics are a server session's; weight and bias are ordinary local parameters. The
server normalizes (x - mean) / sqrt(var + eps) and the affine transform runs locally under autograd.
Gradients with respect to the input are computed locally from the normalized output and the
statistics the server used, by batch norm's closed-form backward, so training matches torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from normserve.client._common import DEFAULT_TARGET
from normserve.client._sync import Client

__all__ = ["RemoteBatchNorm1d", "RemoteBatchNorm2d", "RemoteBatchNorm3d"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


class _RemoteNormalize(torch.autograd.Function):
    """x -> x_hat through the server; backward is batch norm's, from x_hat and the statistics."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: _RemoteBatchNorm, mode: str) -> torch.Tensor:  # type: ignore[override]
        result = module.client.normalize(module.session_id, x, mode=mode)  # type: ignore[arg-type]
        x_hat = result.output
        invstd = torch.rsqrt(result.var.to(x.device) + module.eps)
        ctx.save_for_backward(x_hat, invstd)
        ctx.batch_statistics = result.batch_statistics
        return x_hat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        x_hat, invstd = ctx.saved_tensors
        dtype = grad.dtype
        g, xh = grad.float(), x_hat.float()
        shape = [1, -1] + [1] * (g.dim() - 2)
        inv = invstd.view(shape)
        if ctx.batch_statistics:
            dims = [0, *range(2, g.dim())]
            mean_g = g.mean(dim=dims, keepdim=True)
            mean_gx = (g * xh).mean(dim=dims, keepdim=True)
            dx = inv * (g - mean_g - xh * mean_gx)
        else:
            dx = g * inv
        return dx.to(dtype), None, None


class _RemoteBatchNorm(nn.Module):
    _ranks: tuple[int, ...] = ()
    _name = ""

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
        client: Client | str = DEFAULT_TARGET,
        session_id: str = "",
        server_device: str = "",
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__()
        given = tls or ca_file or cert_file or key_file or token is not None
        if isinstance(client, Client) and given:
            raise ValueError(
                "tls, ca_file, cert_file, key_file and token configure the connection to a "
                "target: give them to the Client you pass, or pass its target instead"
            )
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._owns_client = not isinstance(client, Client)
        if isinstance(client, str):
            client = Client(
                client,
                tls=tls,
                ca_file=ca_file,
                cert_file=cert_file,
                key_file=key_file,
                token=token,
            )
        self.client = client
        info = self.client.create_session(
            num_features,
            session_id=session_id,
            eps=eps,
            momentum=momentum,
            affine=False,  # weight and bias stay local, trainable
            track_running_stats=track_running_stats,
            device=server_device,
        )
        self.session_id = info.session_id
        if affine:
            kw = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.ones(num_features, **kw))  # type: ignore[arg-type]
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))  # type: ignore[arg-type]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ranks:
            ranks = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {ranks} input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        x_hat = _RemoteNormalize.apply(x, self, "train" if self.training else "eval")
        if self.weight is None:
            return x_hat
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = x_hat * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    # ---- the statistics live on the server

    def reset_running_stats(self) -> None:
        self.client.reset_session(self.session_id)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.client.export_state(self.session_id).items():
            destination[prefix + key] = value

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        stats = {k: state_dict[prefix + k] for k in _STATS if prefix + k in state_dict}
        if self.track_running_stats:
            missing_keys += [prefix + k for k in _STATS if k not in stats]
            if stats:
                self.client.import_state(self.session_id, stats, strict=False)
        else:
            unexpected_keys += [prefix + k for k in stats]
        local = {k: v for k, v in state_dict.items() if k[len(prefix) :] not in _STATS}
        super()._load_from_state_dict(
            local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def delete_session(self) -> None:
        """Deletes the server session (the module is unusable afterwards)."""
        self.client.delete_session(self.session_id)
        if self._owns_client:
            self.client.close()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"session={self.session_id!r}, target={self.client.target!r}"
        )


class RemoteBatchNorm1d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm1d`` over ``[N, C]`` or ``[N, C, L]``, statistics on a server."""

    _ranks = (2, 3)


class RemoteBatchNorm2d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm2d`` over ``[N, C, H, W]``, statistics on a server."""

    _ranks = (4,)


class RemoteBatchNorm3d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm3d`` over ``[N, C, D, H, W]``, statistics on a server."""

    _ranks = (5,)
