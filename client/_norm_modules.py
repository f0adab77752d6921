"""``RemoteLayerNorm``, ``RemoteGroupNorm``, ``RemoteInstanceNorm1d/2d/3d``, ``RemoteRMSNorm``:
drop-in torch normalization modules whose normalization runs in a server session.

Each takes its torch module's arguments, then ``client`` (a ``Client`` or a target; with a
target, ``tls``, ``ca_file``, ``cert_file``, ``key_file`` and ``token`` secure the connection as
``Client``'s arguments of the same names do), ``session_id`` and ``server_device``.

As with ``RemoteBatchNorm*d``: the session is created without affine parameters, so the server
returns x_hat = (x - mean) / sqrt(var + eps) (x / sqrt(mean(x^2) + eps) for RMS norm) and the
statistics it used; weight and bias are ordinary local parameters applied under autograd. The
gradient with respect to the input is computed locally from x_hat and those statistics by the
kind's closed-form backward, so training matches torch's modules. Running statistics (instance
norm with ``track_running_stats``) live in the session and appear in ``state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from normserve.client._common import DEFAULT_TARGET, KindName
from normserve.client._sync import Client

__all__ = [
    "RemoteGroupNorm",
    "RemoteInstanceNorm1d",
    "RemoteInstanceNorm2d",
    "RemoteInstanceNorm3d",
    "RemoteLayerNorm",
    "RemoteRMSNorm",
]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _rms_eps(eps: float | None, dtype: torch.dtype) -> float:
    """The eps RMS norm adds for inputs of ``dtype``: torch's eps=None is the machine epsilon of
    the dtype its kernel computes in (float64 for float64 inputs, float32 for the others)."""
    if eps is not None:
        return eps
    return float(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps)


class _RemoteNormalize(torch.autograd.Function):
    """x -> x_hat through the server; backward is the kind's, from x_hat and the statistics."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: _RemoteNorm, mode: str) -> torch.Tensor:  # type: ignore[override]
        result = module.client.normalize(module.session_id, x, mode=mode)  # type: ignore[arg-type]
        x_hat = result.output
        invstd = torch.rsqrt(result.var.to(x.device) + module._eps_for(x.dtype))
        ctx.save_for_backward(x_hat, invstd)
        ctx.module = module
        ctx.batch_statistics = result.batch_statistics
        return x_hat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        x_hat, invstd = ctx.saved_tensors
        g, xh = grad.float(), x_hat.float()
        dx = ctx.module._backward(g, xh, invstd.float(), ctx.batch_statistics)
        return dx.to(grad.dtype), None, None


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


class _RemoteNorm(nn.Module):
    """A module whose normalization is a server session's; subclasses say which kind."""

    _kind: KindName = "layer_norm"
    eps: float | None
    client: Client
    session_id: str

    def _connect(
        self,
        client: Client | str,
        tls: bool,
        ca_file: str | None,
        cert_file: str | None,
        key_file: str | None,
        token: str | None,
    ) -> None:
        given = tls or ca_file or cert_file or key_file or token is not None
        if isinstance(client, Client) and given:
            raise ValueError(
                "tls, ca_file, cert_file, key_file and token configure the connection to a "
                "target: give them to the Client you pass, or pass its target instead"
            )
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

    def _create(self, session_id: str, server_device: str, **config: Any) -> None:
        info = self.client.create_session(
            session_id=session_id,
            kind=self._kind,
            affine=False,  # weight and bias stay local, trainable
            device=server_device,
            **config,
        )
        self.session_id = info.session_id

    def _eps_for(self, dtype: torch.dtype) -> float:
        assert self.eps is not None  # only RMS norm's may be None (it says what it means)
        return self.eps

    def _backward(
        self, g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor, batch_statistics: bool
    ) -> torch.Tensor:
        raise NotImplementedError

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        mode = "train" if self.training else "eval"
        x_hat: torch.Tensor = _RemoteNormalize.apply(x, self, mode)
        return x_hat

    def delete_session(self) -> None:
        """Deletes the server session (the module is unusable afterwards)."""
        self.client.delete_session(self.session_id)
        if self._owns_client:
            self.client.close()

    def _where(self) -> str:
        return f"session={self.session_id!r}, target={self.client.target!r}"


class _Trailing(_RemoteNorm):
    """Layer and RMS norm: normalized over the trailing ``normalized_shape``."""

    normalized_shape: tuple[int, ...]

    def _setup(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None,
        elementwise_affine: bool,
        bias: bool,
        device: Any,
        dtype: torch.dtype | None,
    ) -> None:
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(int(d) for d in shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **kw))
            if bias:
                self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **kw))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _dims(self, g: torch.Tensor) -> list[int]:
        return list(range(g.dim() - len(self.normalized_shape), g.dim()))

    def _invstd(self, g: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
        return invstd.reshape(*invstd.shape, *([1] * len(self.normalized_shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == len(self.normalized_shape)
        if unbatched:  # the server's inputs have a batch dim
            x = x.unsqueeze(0)
        y = self._normalize(x)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        y = y.to(x.dtype)
        return y.squeeze(0) if unbatched else y


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
        self._setup(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self._connect(client, tls, ca_file, cert_file, key_file, token)
        self._create(
            session_id,
            server_device,
            num_features=0,
            eps=eps,
            normalized_shape=self.normalized_shape,
        )

    def _backward(
        self, g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor, batch_statistics: bool
    ) -> torch.Tensor:
        return _groupwise_backward(g, xh, self._invstd(g, invstd), self._dims(g), center=True)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, {self._where()}"
        )


class RemoteRMSNorm(_Trailing):
    """``torch.nn.RMSNorm`` with its normalization in a server session. ``eps=None`` is torch's:
    the machine epsilon of the computation (float64 for float64 inputs, else float32)."""

    _kind = "rms_norm"

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
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
        self._setup(normalized_shape, eps, elementwise_affine, False, device, dtype)
        self._connect(client, tls, ca_file, cert_file, key_file, token)
        self._create(
            session_id,
            server_device,
            num_features=0,
            eps=eps,
            normalized_shape=self.normalized_shape,
        )

    def _eps_for(self, dtype: torch.dtype) -> float:
        return _rms_eps(self.eps, dtype)

    def _backward(
        self, g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor, batch_statistics: bool
    ) -> torch.Tensor:
        return _groupwise_backward(g, xh, self._invstd(g, invstd), self._dims(g), center=False)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, {self._where()}"
        )


class _PerChannel(_RemoteNorm):
    """Group and instance norm: per-channel weight and bias over [N, C, *]."""

    num_features: int

    def _params(self, affine: bool, device: Any, dtype: torch.dtype | None) -> None:
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(self.num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(self.num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.weight is None:
            return y
        shape = [1, -1] + [1] * (y.dim() - 2)
        return y * self.weight.view(shape) + self.bias.view(shape)


class RemoteGroupNorm(_PerChannel):
    """``torch.nn.GroupNorm`` with its normalization in a server session."""

    _kind = "group_norm"

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
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
        self.num_groups = num_groups
        self.num_channels = self.num_features = num_channels
        self.eps = eps
        self.affine = affine
        self._params(affine, device, dtype)
        self._connect(client, tls, ca_file, cert_file, key_file, token)
        self._create(
            session_id, server_device, num_features=num_channels, num_groups=num_groups, eps=eps
        )

    def _backward(
        self, g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor, batch_statistics: bool
    ) -> torch.Tensor:
        n = g.shape[0]
        grouped = (n, self.num_groups, -1)
        dx = _groupwise_backward(
            g.reshape(grouped), xh.reshape(grouped), invstd.reshape(n, -1, 1), [2], center=True
        )
        return dx.reshape(g.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._affine(self._normalize(x)).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"{self._where()}"
        )


class _RemoteInstanceNorm(_PerChannel):
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
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self._params(affine, device, dtype)
        self._connect(client, tls, ca_file, cert_file, key_file, token)
        self._create(
            session_id,
            server_device,
            num_features=num_features,
            eps=eps,
            momentum=momentum,
            track_running_stats=track_running_stats,
        )

    def _backward(
        self, g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor, batch_statistics: bool
    ) -> torch.Tensor:
        if not batch_statistics:  # the running statistics: constants, [C]
            return g * invstd.view([1, -1] + [1] * (g.dim() - 2))
        n, c = g.shape[:2]
        flat = (n, c, -1)
        dx = _groupwise_backward(
            g.reshape(flat), xh.reshape(flat), invstd.reshape(n, c, 1), [2], center=True
        )
        return dx.reshape(g.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (self._rank - 1, self._rank):
            raise ValueError(
                f"expected {self._rank - 1}D or {self._rank}D input (got {x.dim()}D input)"
            )
        unbatched = x.dim() == self._rank - 1
        if unbatched:
            x = x.unsqueeze(0)
        y = self._affine(self._normalize(x)).to(x.dtype)
        return y.squeeze(0) if unbatched else y

    # ---- running statistics (track_running_stats) live on the server

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.client.reset_session(self.session_id)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.track_running_stats:
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

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"{self._where()}"
        )


class RemoteInstanceNorm1d(_RemoteInstanceNorm):
    """``torch.nn.InstanceNorm1d`` over ``[N, C, L]`` (or ``[C, L]``), in a server session."""

    _kind = "instance_norm"
    _rank = 3


class RemoteInstanceNorm2d(_RemoteInstanceNorm):
    """``torch.nn.InstanceNorm2d`` over ``[N, C, H, W]`` (or ``[C, H, W]``), in a server session."""

    _kind = "instance_norm"
    _rank = 4


class RemoteInstanceNorm3d(_RemoteInstanceNorm):
    """``torch.nn.InstanceNorm3d`` over ``[N, C, D, H, W]`` (or ``[C, D, H, W]``), in a server
    session."""

    _kind = "instance_norm"
    _rank = 5
