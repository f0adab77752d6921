"""Session configuration and call modes, validated once at creation."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

from normserve.server.service._errors import FailedPrecondition, InvalidArgument

__all__ = [
    "ANSWER_OVERHEAD_BYTES",
    "DEFAULT_MAX_FEATURES",
    "MAX_EPS",
    "MIN_EPS",
    "Kind",
    "Mode",
    "SessionConfig",
    "max_features_for",
    "resolve_device",
]

#: num_features bound when the server does not derive one from its message limit.
DEFAULT_MAX_FEATURES = 1 << 20
#: Room for everything but tensor data in an answer (statistics headers, scalars, framing).
ANSWER_OVERHEAD_BYTES = 4096


def max_features_for(message_bytes: int) -> int:
    """The most features whose session still fits one message: a session, an export, and the
    answer to a [2, C] TRAIN call each carry four float32 [C] tensors (16 bytes a feature)."""
    return max(1, (message_bytes - ANSWER_OVERHEAD_BYTES) // 16)


#: eps is added to float32 variances: below float32's smallest normal it vanishes (x / 0 on a
#: constant channel), and past 1e6 it swamps any activation's variance (beyond it, float32 squares
#: of 1/sqrt(var + eps) underflow and the variance cannot be recovered).
MIN_EPS = 1.1754943508222875e-38
MAX_EPS = 1e6


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
    #: idle seconds before the session expires (0: never; None: the server's default)
    ttl_seconds: float | None = None

    def validate(self, max_features: int = DEFAULT_MAX_FEATURES) -> None:
        """Raises InvalidArgument naming the first bad field. ``max_features`` is the server's
        bound, which keeps every session readable and exportable in one message."""
        if not 1 <= self.num_features <= max_features:
            raise InvalidArgument(
                "config.num_features",
                f"must be between 1 and {max_features} (this server's --max-features), "
                f"got {self.num_features}",
            )
        if not (math.isfinite(self.eps) and MIN_EPS <= self.eps <= MAX_EPS):
            raise InvalidArgument(
                "config.eps",
                f"must be between {MIN_EPS:.3g} (float32's smallest normal) and {MAX_EPS:g}, "
                f"got {self.eps}",
            )
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
