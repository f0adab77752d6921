"""Session configuration and call modes, validated once at creation."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from normserve.server.service._errors import FailedPrecondition, InvalidArgument

__all__ = ["Kind", "Mode", "SessionConfig", "resolve_device"]


class Kind(enum.Enum):
    """What a session computes. Later kinds (layer, group, instance, RMS norm, renorm) join here."""

    BATCH_NORM = "batch_norm"


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


@dataclass(frozen=True)
class SessionConfig:
    """A session's immutable configuration; defaults are torch.nn.BatchNorm's."""

    num_features: int
    eps: float = 1e-5
    #: EMA factor in (0, 1]; None is the cumulative moving average (torch's momentum=None).
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    #: Accept NaN/Inf in inputs; off by default so one bad batch cannot poison the statistics.
    allow_non_finite: bool = False
    #: "auto" (the server's default), "cpu", "cuda" or "cuda:N".
    device: str = "auto"
    kind: Kind = Kind.BATCH_NORM

    def validate(self) -> None:
        """Raises InvalidArgument naming the first bad field."""
        if not 1 <= self.num_features <= 1 << 24:
            raise InvalidArgument(
                "config.num_features", f"must be between 1 and {1 << 24}, got {self.num_features}"
            )
        if not (math.isfinite(self.eps) and self.eps > 0):
            raise InvalidArgument("config.eps", f"must be a finite number > 0, got {self.eps}")
        if self.momentum is not None and not (
            math.isfinite(self.momentum) and 0 < self.momentum <= 1
        ):
            raise InvalidArgument(
                "config.momentum",
                f"must be in (0, 1], or unset for a cumulative average; got {self.momentum}",
            )


def resolve_device(
    preference: str, default: torch.device, field: str = "config.device"
) -> torch.device:
    """Turns a device preference into a device this process can use, or raises naming ``field``."""
    if preference in ("", "auto"):
        return default
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise InvalidArgument(
            field, f"unknown device {preference!r}; expected auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise InvalidArgument(
            "config.device",
            f"unsupported device {preference!r}; expected auto, cpu, cuda or cuda:N",
        )
    if not torch.cuda.is_available():
        raise FailedPrecondition(f"{field}: {preference!r} requested, but this server has no CUDA")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise FailedPrecondition(
            f"{field}: {preference!r} requested, but this server has "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)
