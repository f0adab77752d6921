"""The session kinds benchmarks/parity.py compares with torch: for each, the configs it cycles
through, the shapes it draws, the remote module, and torch's module (or, where torch has none, a
reference written from the kind's definition) in any dtype."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normserve.client import (
    Client,
    RemoteBatchNorm1d,
    RemoteBatchNorm2d,
    RemoteBatchNorm3d,
    RemoteBatchRenorm1d,
    RemoteBatchRenorm2d,
    RemoteBatchRenorm3d,
    RemoteGhostBatchNorm1d,
    RemoteGhostBatchNorm2d,
    RemoteGhostBatchNorm3d,
    RemoteGroupNorm,
    RemoteInstanceNorm1d,
    RemoteInstanceNorm2d,
    RemoteInstanceNorm3d,
    RemoteLayerNorm,
    RemoteRecurrentBatchNorm1d,
    RemoteRMSNorm,
)

#: the fewest values any one mean and variance is taken over: with fewer, the input gradient is
#: decided by float32 cancellation, torch's own kernel included (tests/client/test_batch_modules.py)
MIN_VALUES = 8


@dataclass
class Step:
    """One call: the input's shape, TRAIN or EVAL, and forward's extra arguments (a time step)."""

    shape: tuple[int, ...]
    train: bool
    args: tuple[Any, ...] = ()


@dataclass
class Case:
    """One round: its config, the remote module, torch's module in a given dtype, the calls."""

    config: dict[str, Any]
    remote: nn.Module
    reference: Callable[[torch.dtype], nn.Module]
    steps: list[Step]


Builder = Callable[[random.Random, dict[str, Any], Client], Case]


@dataclass(frozen=True)
class Kind:
    """A row of the report: the configs its rounds cycle through (every one is met when the rounds
    are at least as many), how a round is built, and the input dtype (half rows: outputs only)."""

    name: str
    combos: list[dict[str, Any]]
    build: Builder
    dtype: torch.dtype = torch.float32


def grid(**axes: list[Any]) -> list[dict[str, Any]]:
    """Every combination of the axes' values."""
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


# ---- shapes


def dims_with(rng: random.Random, rank: int, at_least: int, lo: int = 1, hi: int = 4) -> list[int]:
    """``rank`` sizes in [lo, hi], the last raised until their product is ``at_least`` (an empty
    list when rank is 0)."""
    dims = [rng.randint(lo, hi) for _ in range(rank)]
    if dims and math.prod(dims) < at_least:
        dims[-1] = -(-at_least // math.prod(dims[:-1]))
    return dims


def extent(rng: random.Random) -> tuple[int, int]:
    """The largest spatial size and batch size of a round: small, or larger one round in four
    (sums over more values, where float32 accumulation differs most)."""
    return (8, 32) if rng.random() < 0.25 else (4, 8)


def modes(rng: random.Random) -> list[bool]:
    """Several TRAIN calls, then EVAL calls."""
    return [True] * rng.randint(2, 4) + [False] * rng.randint(1, 2)


def batch(rng: random.Random, per_sample: int, hi: int) -> int:
    """A batch size of 2 to ``hi`` with at least MIN_VALUES values per channel."""
    return max(rng.randint(2, hi), -(-MIN_VALUES // per_sample))


def batch_rank(rng: random.Random, dims: int) -> int:
    """The input rank of a 1d/2d/3d module: 1d takes [N, C] or [N, C, L]."""
    return rng.choice([2, 3]) if dims == 1 else dims + 2


# ---- references torch has no module for


class RenormReference(nn.Module):
    """Batch renormalization as Ioffe (2017, Algorithm 1) defines it, r and d held constant in
    the backward; the limits ramp linearly over their warm-up steps (the NORM_KIND_BATCH_RENORM
    comment in proto/normserve/v1/normserve.proto)."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, c: int, eps: float, momentum: float | None, affine: bool, **limits: Any):
        super().__init__()
        self.eps, self.momentum, self.limits = eps, momentum, limits
        self.weight = nn.Parameter(torch.ones(c)) if affine else None
        self.bias = nn.Parameter(torch.zeros(c)) if affine else None
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))
        self.register_buffer("num_batches_tracked", torch.tensor(0))

    def forward(self, x: Tensor) -> Tensor:
        rm, rv = self.running_mean, self.running_var
        if not self.training:
            return F.batch_norm(x, rm, rv, self.weight, self.bias, False, 0.0, self.eps)
        t, k = int(self.num_batches_tracked), self.limits
        ramp_r = min(1.0, t / k["rmax_warmup_steps"]) if k["rmax_warmup_steps"] else 1.0
        ramp_d = min(1.0, t / k["dmax_warmup_steps"]) if k["dmax_warmup_steps"] else 1.0
        rmax, dmax = 1 + (k["rmax"] - 1) * ramp_r, k["dmax"] * ramp_d
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0, *range(2, x.dim())]
        mu, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        sigma_b, sigma = (var + self.eps).sqrt(), (rv + self.eps).sqrt()
        r = (sigma_b / sigma).clamp(1 / rmax, rmax).detach()
        d = ((mu - rm) / sigma).clamp(-dmax, dmax).detach()
        y = (x - mu.view(shape)) / sigma_b.view(shape) * r.view(shape) + d.view(shape)
        self.num_batches_tracked += 1
        factor = self.momentum or 1.0 / int(self.num_batches_tracked)
        n = x.numel() // x.shape[1]
        with torch.no_grad():
            rm.lerp_(mu, factor)
            rv.lerp_(var * n / (n - 1), factor)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class GhostReference(nn.Module):
    """Ghost batch norm: in TRAIN, a loop of F.batch_norm over input.split(G), each virtual batch
    folded into the running statistics in turn; in EVAL, batch norm's."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor

    def __init__(
        self, c: int, eps: float, momentum: float | None, affine: bool, track: bool, ghost: int
    ) -> None:
        super().__init__()
        self.eps, self.momentum, self.ghost = eps, momentum, ghost
        self.weight = nn.Parameter(torch.ones(c)) if affine else None
        self.bias = nn.Parameter(torch.zeros(c)) if affine else None
        self.register_buffer("running_mean", torch.zeros(c) if track else None)
        self.register_buffer("running_var", torch.ones(c) if track else None)
        self.register_buffer("num_batches_tracked", torch.tensor(0) if track else None)

    def _one(self, x: Tensor) -> Tensor:
        factor = 0.0
        if self.running_mean is not None:
            self.num_batches_tracked += 1
            factor = self.momentum or 1.0 / int(self.num_batches_tracked)
        args = (self.running_mean, self.running_var, self.weight, self.bias)
        return F.batch_norm(x, *args, True, factor, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return torch.cat([self._one(part) for part in x.split(self.ghost)])
        stats = self.running_mean is None  # no running statistics: the whole batch's
        args = (self.running_mean, self.running_var, self.weight, self.bias)
        return F.batch_norm(x, *args, stats, 0.0, self.eps)


class RecurrentReference(nn.Module):
    """Recurrent batch norm (Cooijmans et al. 2016): T torch.nn.BatchNorm1d sharing one weight and
    bias; steps past the last use the last."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self, c: int, steps: int, eps: float, momentum: float, affine: bool, track: bool
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c)) if affine else None
        self.bias = nn.Parameter(torch.zeros(c)) if affine else None
        self.track = track
        self.steps = nn.ModuleList(
            nn.BatchNorm1d(c, eps, momentum, affine=False, track_running_stats=track)
            for _ in range(steps)
        )

    def forward(self, x: Tensor, t: int) -> Tensor:
        y: Tensor = self.steps[min(t, len(self.steps) - 1)](x)
        if self.weight is not None and self.bias is not None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def running_stats(self) -> dict[str, Tensor]:
        """The remote module's state: [T, C] running statistics, one count for every slot."""
        if not self.track:
            return {}
        bns: list[Any] = list(self.steps)
        return {
            "running_mean": torch.stack([m.running_mean for m in bns]),
            "running_var": torch.stack([m.running_var for m in bns]),
            "num_batches_tracked": sum(m.num_batches_tracked for m in bns),
        }


def running_stats(module: nn.Module) -> dict[str, Tensor]:
    """running_mean, running_var and num_batches_tracked, where the module keeps them."""
    own = getattr(module, "running_stats", None)
    if callable(own):
        stats: dict[str, Tensor] = own()
        return stats
    state = module.state_dict()
    names = ("running_mean", "running_var", "num_batches_tracked")
    return {k: state[k] for k in names if state.get(k) is not None}


# ---- the kinds

BATCH = {1: (RemoteBatchNorm1d, nn.BatchNorm1d), 2: (RemoteBatchNorm2d, nn.BatchNorm2d)}
BATCH[3] = (RemoteBatchNorm3d, nn.BatchNorm3d)
INSTANCE = {
    1: (RemoteInstanceNorm1d, nn.InstanceNorm1d),
    2: (RemoteInstanceNorm2d, nn.InstanceNorm2d),
}
INSTANCE[3] = (RemoteInstanceNorm3d, nn.InstanceNorm3d)
RENORM = {1: RemoteBatchRenorm1d, 2: RemoteBatchRenorm2d, 3: RemoteBatchRenorm3d}
GHOST = {1: RemoteGhostBatchNorm1d, 2: RemoteGhostBatchNorm2d, 3: RemoteGhostBatchNorm3d}
EPS = [1e-5, 1e-3]


def batch_norm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    remote_cls, torch_cls = BATCH[cfg["dims"]]
    c, rank, eps = rng.randint(1, 6), batch_rank(rng, cfg["dims"]), rng.choice(EPS)
    hi, n_hi = extent(rng)
    spatial = dims_with(rng, rank - 2, 1, hi=hi)
    kw = {k: cfg[k] for k in ("momentum", "affine", "track_running_stats")}
    remote = remote_cls(c, eps, **kw, client=client)
    steps = [Step((batch(rng, math.prod(spatial), n_hi), c, *spatial), t) for t in modes(rng)]
    config = {**cfg, "channels": c, "eps": eps}
    return Case(config, remote, lambda dtype: torch_cls(c, eps, **kw, dtype=dtype), steps)


def _trailing(rng: random.Random, k: int) -> tuple[list[int], list[list[int]]]:
    """A normalized_shape of k dims with at least MIN_VALUES values, and the leading dims of a
    few calls (1 or 2 of them)."""
    hi, n_hi = extent(rng)
    shape = dims_with(rng, k, MIN_VALUES, 2, hi + 1)
    lead = [n_hi] + [4] * rng.randint(0, 1)
    return shape, [[rng.randint(1, d) for d in lead] for _ in range(5)]


def layer_norm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    shape, leads = _trailing(rng, cfg["dims"])
    eps, affine, bias = rng.choice(EPS), cfg["elementwise_affine"], cfg["bias"]
    remote = RemoteLayerNorm(shape, eps, affine, bias, client=client)
    steps = [Step((*lead, *shape), t) for lead, t in zip(leads, modes(rng), strict=False)]
    config = {**cfg, "normalized_shape": shape, "eps": eps}
    return Case(
        config, remote, lambda dtype: nn.LayerNorm(shape, eps, affine, bias, dtype=dtype), steps
    )


def rms_norm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    shape, leads = _trailing(rng, cfg["dims"])
    eps = rng.choice([1e-6, *EPS]) if cfg["eps_set"] else None
    affine = cfg["elementwise_affine"]
    remote = RemoteRMSNorm(shape, eps, affine, client=client)
    steps = [Step((*lead, *shape), t) for lead, t in zip(leads, modes(rng), strict=False)]
    config = {**cfg, "normalized_shape": shape, "eps": eps}
    return Case(config, remote, lambda dtype: nn.RMSNorm(shape, eps, affine, dtype=dtype), steps)


def group_norm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    c, (hi, n_hi) = rng.choice([4, 6, 8]), extent(rng)
    groups = {"one": 1, "all": c, "some": rng.choice([d for d in range(2, c) if c % d == 0])}
    g = groups[cfg["groups"]]
    spatial = dims_with(rng, rng.randint(0, 3), -(-MIN_VALUES // (c // g)), hi=hi)
    if c // g * math.prod(spatial) < MIN_VALUES:  # [N, C] with one channel per group: too few
        spatial = [-(-MIN_VALUES // (c // g))]
    eps, affine = rng.choice(EPS), cfg["affine"]
    remote = RemoteGroupNorm(g, c, eps, affine, client=client)
    steps = [Step((rng.randint(1, n_hi), c, *spatial), t) for t in modes(rng)]
    config = {**cfg, "num_groups": g, "channels": c, "eps": eps}
    return Case(config, remote, lambda dtype: nn.GroupNorm(g, c, eps, affine, dtype=dtype), steps)


def instance_norm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    remote_cls, torch_cls = INSTANCE[cfg["dims"]]
    c, eps, (hi, n_hi) = rng.randint(1, 6), rng.choice(EPS), extent(rng)
    spatial = dims_with(rng, cfg["dims"], MIN_VALUES, hi=hi)
    kw = {k: cfg[k] for k in ("affine", "track_running_stats")}
    kw["momentum"] = rng.choice([0.1, None])
    remote = remote_cls(c, eps, **kw, client=client)
    steps = [Step((rng.randint(1, n_hi), c, *spatial), t) for t in modes(rng)]
    config = {**cfg, "channels": c, "eps": eps, "momentum": kw["momentum"]}
    return Case(config, remote, lambda dtype: torch_cls(c, eps, **kw, dtype=dtype), steps)


def batch_renorm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    c, rank, eps = rng.randint(1, 6), batch_rank(rng, cfg["dims"]), rng.choice(EPS)
    hi, n_hi = extent(rng)
    spatial = dims_with(rng, rank - 2, 1, hi=hi)
    limits: dict[str, Any] = {
        "rmax": rng.choice([1.0, 1.5, 3.0]),
        "dmax": rng.choice([0.0, 0.5, 5.0]),
        "rmax_warmup_steps": rng.randint(0, 2),
        "dmax_warmup_steps": rng.randint(0, 2),
    }
    momentum, affine = cfg["momentum"], cfg["affine"]
    remote = RENORM[cfg["dims"]](c, eps, momentum, affine, client=client, **limits)
    steps = [Step((batch(rng, math.prod(spatial), n_hi), c, *spatial), t) for t in modes(rng)]

    def reference(dtype: torch.dtype) -> nn.Module:
        return RenormReference(c, eps, momentum, affine, **limits).to(dtype)

    return Case({**cfg, "channels": c, "eps": eps, **limits}, remote, reference, steps)


def ghost_batch_norm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    dims, c, eps = rng.randint(1, 3), rng.randint(1, 6), rng.choice(EPS)
    hi, n_hi = extent(rng)
    spatial = dims_with(rng, batch_rank(rng, dims) - 2, 1, hi=hi)
    per_sample = math.prod(spatial)
    ghost = max(rng.randint(2, 6), -(-MIN_VALUES // per_sample))
    rests = [0, *(r for r in range(1, ghost) if r * per_sample >= MIN_VALUES)]
    momentum, affine, track = cfg["momentum"], cfg["affine"], cfg["track_running_stats"]
    remote = GHOST[dims](c, eps, momentum, affine, track, client=client, ghost_batch_size=ghost)
    steps = [
        Step((ghost * rng.randint(1, n_hi // 2) + rng.choice(rests), c, *spatial), t)
        for t in modes(rng)
    ]

    def reference(dtype: torch.dtype) -> nn.Module:
        return GhostReference(c, eps, momentum, affine, track, ghost).to(dtype)

    config = {**cfg, "dims": dims, "channels": c, "eps": eps, "ghost_batch_size": ghost}
    return Case(config, remote, reference, steps)


def recurrent_batch_norm(rng: random.Random, cfg: dict[str, Any], client: Client) -> Case:
    c, eps, slots = rng.randint(1, 6), rng.choice(EPS), rng.randint(1, 3)
    hi, n_hi = extent(rng)
    spatial = dims_with(rng, rng.randint(0, 1), 1, hi=hi)
    momentum = rng.choice([0.1, 0.5])
    affine, track = cfg["affine"], cfg["track_running_stats"]
    remote = RemoteRecurrentBatchNorm1d(c, slots, eps, momentum, affine, track, client=client)
    calls = [True] * rng.randint(3, 6) + [False] * rng.randint(1, 3)
    steps = [
        Step((batch(rng, math.prod(spatial), n_hi), c, *spatial), t, (rng.randint(0, slots),))
        for t in calls
    ]

    def reference(dtype: torch.dtype) -> nn.Module:
        return RecurrentReference(c, slots, eps, momentum, affine, track).to(dtype)

    config = {**cfg, "channels": c, "eps": eps, "time_steps": slots, "momentum": momentum}
    return Case(config, remote, reference, steps)


def _batch_norm_grid(dims: int) -> list[dict[str, Any]]:
    axes = grid(momentum=[0.1, None], affine=[True, False], track_running_stats=[True, False])
    return [{"dims": dims, **c} for c in axes]


KINDS = [
    Kind("batch_norm1d", _batch_norm_grid(1), batch_norm),
    Kind("batch_norm2d", _batch_norm_grid(2), batch_norm),
    Kind("batch_norm3d", _batch_norm_grid(3), batch_norm),
    Kind(
        "layer_norm",
        grid(dims=[1, 2, 3], elementwise_affine=[True, False], bias=[True, False]),
        layer_norm,
    ),
    Kind("group_norm", grid(groups=["one", "some", "all"], affine=[True, False]), group_norm),
    Kind(
        "instance_norm",
        grid(dims=[1, 2, 3], track_running_stats=[True, False], affine=[True, False]),
        instance_norm,
    ),
    Kind(
        "rms_norm",
        grid(dims=[1, 2, 3], eps_set=[False, True], elementwise_affine=[True, False]),
        rms_norm,
    ),
    Kind(
        "batch_renorm",
        grid(dims=[1, 2, 3], momentum=[0.1, None], affine=[True, False]),
        batch_renorm,
    ),
    Kind(
        "ghost_batch_norm",
        grid(momentum=[0.1, None], affine=[True, False], track_running_stats=[True, False]),
        ghost_batch_norm,
    ),
    Kind(
        "recurrent_batch_norm",
        grid(affine=[True, False], track_running_stats=[True, False]),
        recurrent_batch_norm,
    ),
]

#: batch norm on half inputs, against torch's own half computation (float32 parameters and
#: statistics, as normserve's): outputs and running statistics, no gradients
HALF_KINDS = [
    Kind(
        f"batch_norm {name}",
        [
            {"momentum": 0.1, **c}
            for c in grid(dims=[1, 2, 3], affine=[True, False], track_running_stats=[True, False])
        ],
        batch_norm,
        dtype,
    )
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16))
]
