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
    "DEFAULT_SYNC_TIMEOUT",
    "KIND_DEFAULTS",
    "MAX_EPS",
    "MAX_NORMALIZED_DIMS",
    "MAX_SYNC_PARTICIPANTS",
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
    """What a session computes, each as its torch module does (batch renorm and ghost batch norm
    as their papers define them; torch has no module for them)."""

    BATCH_NORM = "batch_norm"
    LAYER_NORM = "layer_norm"
    GROUP_NORM = "group_norm"
    INSTANCE_NORM = "instance_norm"
    RMS_NORM = "rms_norm"
    BATCH_RENORM = "batch_renorm"
    GHOST_BATCH_NORM = "ghost_batch_norm"
    RECURRENT_BATCH_NORM = "recurrent_batch_norm"

    @property
    def title(self) -> str:
        """How messages name the kind ("layer norm")."""
        return self.value.replace("_", " ").replace("rms", "RMS")

    @property
    def keeps_running_stats(self) -> bool:
        """Whether the kind can keep running statistics (and so reads momentum)."""
        return self in (
            Kind.BATCH_NORM,
            Kind.INSTANCE_NORM,
            Kind.BATCH_RENORM,
            Kind.GHOST_BATCH_NORM,
            Kind.RECURRENT_BATCH_NORM,
        )

    @property
    def per_shape(self) -> bool:
        """Whether the kind normalizes trailing dims given by normalized_shape."""
        return self in (Kind.LAYER_NORM, Kind.RMS_NORM)


#: The fields whose torch default differs by kind, where it is not SessionConfig's (batch norm's);
#: ``SessionConfig.of`` applies them to what a caller leaves out.
KIND_DEFAULTS: dict[Kind, dict[str, object]] = {
    Kind.BATCH_NORM: {},
    Kind.LAYER_NORM: {"momentum": None, "track_running_stats": False},
    Kind.GROUP_NORM: {"momentum": None, "track_running_stats": False},
    Kind.INSTANCE_NORM: {"affine": False, "track_running_stats": False},
    Kind.RMS_NORM: {"momentum": None, "track_running_stats": False, "eps": None},
    Kind.BATCH_RENORM: {"rmax": 3.0, "dmax": 5.0},
    Kind.GHOST_BATCH_NORM: {},
    Kind.RECURRENT_BATCH_NORM: {},
}

#: A synchronized session's participants at most, and its step timeout unless the config sets one.
MAX_SYNC_PARTICIPANTS = 4096
DEFAULT_SYNC_TIMEOUT = 30.0
MAX_SYNC_TIMEOUT = 3600.0

#: The most dims a normalized_shape may have (torch's tensors have at most a few dozen).
MAX_NORMALIZED_DIMS = 16


class Mode(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"
    #: a recalibration batch: normalized with its own statistics, folded into the accumulator
    CALIBRATE = "calibrate"


@dataclass(frozen=True)
class SessionConfig:
    """A session's immutable configuration; defaults are torch.nn.BatchNorm's (``of`` gives each
    kind torch's defaults for it)."""

    num_features: int
    #: None: RMS norm's torch default, the machine epsilon of the computation's dtype
    eps: float | None = 1e-5
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
    #: layer and RMS norm: the normalized trailing dims (empty for the other kinds)
    normalized_shape: tuple[int, ...] = ()
    #: group norm: how many groups the channels are split into (0 for the other kinds)
    num_groups: int = 0
    #: layer norm: a bias beside the weight (None, unset, reads as True; other kinds: None)
    bias: bool | None = None
    #: batch norm: the participants of a synchronized session (0: not synchronized)
    sync_participants: int = 0
    #: seconds a synchronized step waits for its last participant
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT
    #: batch renorm: the limits of r and d (None for the other kinds), and the batches over which
    #: each ramps from 1 (r) and 0 (d) to them; see ``renorm_limits``
    rmax: float | None = None
    dmax: float | None = None
    rmax_warmup_steps: int = 0
    dmax_warmup_steps: int = 0
    #: ghost batch norm: the size of its virtual batches (0 for the other kinds)
    ghost_batch_size: int = 0
    #: recurrent batch norm: its time-step slots (0 for the other kinds)
    time_steps: int = 0

    def __post_init__(self) -> None:
        # a config read back from JSON carries a list; and layer and RMS norm may leave
        # num_features to be the product of normalized_shape
        shape = tuple(self.normalized_shape)
        object.__setattr__(self, "normalized_shape", shape)
        if (
            self.kind.per_shape
            and self.num_features == 0
            and 0 < len(shape) <= MAX_NORMALIZED_DIMS
            and min(shape) > 0
        ):
            object.__setattr__(self, "num_features", math.prod(shape))
        if self.kind is Kind.LAYER_NORM and self.bias is None:
            object.__setattr__(self, "bias", True)

    @classmethod
    def of(cls, kind: Kind, num_features: int = 0, **fields: object) -> SessionConfig:
        """A config of ``kind`` with torch's defaults for that kind where ``fields`` has none."""
        return cls(num_features, kind=kind, **{**KIND_DEFAULTS[kind], **fields})  # type: ignore[arg-type]

    @property
    def resolved_eps(self) -> float:
        """eps as a float (RMS norm's unset eps is decided per input; this is float32's)."""
        return self.eps if self.eps is not None else float(torch.finfo(torch.float32).eps)

    def renorm_limits(self, n: int) -> tuple[float, float]:
        """Batch renorm's (rmax_t, dmax_t) for the TRAIN batch that makes num_batches_tracked
        ``n``: t = n - 1 batches came before it, and each limit ramps linearly from 1 (rmax) and
        0 (dmax) over its warm-up, reaching the configured value at t = warm-up steps."""
        assert self.rmax is not None and self.dmax is not None
        t = max(n - 1, 0)

        def ramp(steps: int) -> float:
            return 1.0 if steps <= 0 else min(1.0, t / steps)

        return 1.0 + (self.rmax - 1.0) * ramp(self.rmax_warmup_steps), self.dmax * ramp(
            self.dmax_warmup_steps
        )

    def validate(self, max_features: int = DEFAULT_MAX_FEATURES) -> None:
        """Raises InvalidArgument naming the first bad field. ``max_features`` is the server's
        bound, which keeps every session readable and exportable in one message."""
        self._validate_kind_fields()
        if not 1 <= self.num_features <= max_features:
            raise InvalidArgument(
                "config.num_features",
                f"must be between 1 and {max_features} (this server's --max-features), "
                f"got {self.num_features}",
            )
        if self.time_steps * self.num_features > max_features:
            # [T, C] running statistics are read and exported in one message, like [C] ones
            raise InvalidArgument(
                "config.time_steps",
                f"time_steps x num_features must be at most {max_features} (this server's "
                f"--max-features), got {self.time_steps} x {self.num_features}",
            )
        if self.eps is None:
            if self.kind is not Kind.RMS_NORM:
                raise InvalidArgument(
                    "config.eps", f"{self.kind.title} needs an eps (only RMS norm's may be unset)"
                )
        elif not (math.isfinite(self.eps) and MIN_EPS <= self.eps <= MAX_EPS):
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
        if self.kind is Kind.GROUP_NORM and self.num_features % self.num_groups:
            raise InvalidArgument(
                "config.num_groups",
                f"must divide num_features ({self.num_features}), got {self.num_groups}",
            )

    def _validate_kind_fields(self) -> None:
        """The fields only some kinds read: given to another kind, they are refused (a typo must
        not silently make another normalization); needed by this one, they must be right."""
        kind, name = self.kind, self.kind.title
        if not kind.keeps_running_stats:
            if self.track_running_stats:
                raise InvalidArgument(
                    "config.track_running_stats",
                    f"{name} keeps no running statistics (only batch and instance norm do); "
                    "leave it unset or false",
                )
            if self.momentum is not None:
                raise InvalidArgument(
                    "config.momentum",
                    f"{name} keeps no running statistics (only batch and instance norm do); "
                    "leave it unset",
                )
        if kind.per_shape:
            self._validate_normalized_shape()
        elif self.normalized_shape:
            raise InvalidArgument(
                "config.normalized_shape",
                f"only layer and RMS norm read it; {name} normalizes over fixed dims",
            )
        if kind is Kind.GROUP_NORM:
            if self.num_groups <= 0:
                raise InvalidArgument(
                    "config.num_groups", f"group norm needs num_groups > 0, got {self.num_groups}"
                )
        elif self.num_groups:
            raise InvalidArgument("config.num_groups", f"only group norm reads it, not {name}")
        if kind is not Kind.LAYER_NORM and self.bias is not None:
            why = "RMS norm has no bias" if kind is Kind.RMS_NORM else f"{name}'s comes with affine"
            raise InvalidArgument("config.bias", f"only layer norm reads it; {why}")
        self._validate_sync()
        self._validate_renorm()
        if kind is Kind.GHOST_BATCH_NORM:
            if self.ghost_batch_size <= 0:
                raise InvalidArgument(
                    "config.ghost_batch_size",
                    f"ghost batch norm needs ghost_batch_size > 0, got {self.ghost_batch_size}",
                )
        elif self.ghost_batch_size:
            raise InvalidArgument(
                "config.ghost_batch_size", f"only ghost batch norm reads it, not {name}"
            )
        if kind is Kind.RECURRENT_BATCH_NORM:
            if self.time_steps <= 0:
                raise InvalidArgument(
                    "config.time_steps",
                    f"recurrent batch norm needs time_steps > 0, got {self.time_steps}",
                )
            if self.momentum is None and self.track_running_stats:
                raise InvalidArgument(
                    "config.momentum",
                    "recurrent batch norm keeps one num_batches_tracked for all its slots, so no "
                    "cumulative average per slot; give a momentum",
                )
        elif self.time_steps:
            raise InvalidArgument(
                "config.time_steps", f"only recurrent batch norm reads it, not {name}"
            )

    def _validate_sync(self) -> None:
        k = self.sync_participants
        if not k:
            return
        if self.kind is not Kind.BATCH_NORM:
            raise InvalidArgument(
                "config.sync",
                f"only batch norm sessions can be synchronized, not {self.kind.title}",
            )
        if not 2 <= k <= MAX_SYNC_PARTICIPANTS:
            raise InvalidArgument(
                "config.sync.participants",
                f"must be between 2 and {MAX_SYNC_PARTICIPANTS}, got {k}",
            )
        if not (math.isfinite(self.sync_timeout) and 0 < self.sync_timeout <= MAX_SYNC_TIMEOUT):
            raise InvalidArgument(
                "config.sync.timeout_seconds",
                f"must be in (0, {MAX_SYNC_TIMEOUT:g}], got {self.sync_timeout}",
            )

    def _validate_renorm(self) -> None:
        name = self.kind.title
        fields = ("rmax", "dmax", "rmax_warmup_steps", "dmax_warmup_steps")
        if self.kind is not Kind.BATCH_RENORM:
            for f in fields:
                if getattr(self, f):
                    raise InvalidArgument(
                        f"config.renorm.{f}", f"only batch renorm reads it, not {name}"
                    )
            return
        if not self.track_running_stats:
            raise InvalidArgument(
                "config.track_running_stats",
                "batch renorm corrects batch statistics towards running ones; it needs true",
            )
        rmax, dmax = self.rmax, self.dmax
        if rmax is None or not (math.isfinite(rmax) and rmax >= 1):
            raise InvalidArgument("config.renorm.rmax", f"must be a finite value >= 1, got {rmax}")
        if dmax is None or not (math.isfinite(dmax) and dmax >= 0):
            raise InvalidArgument("config.renorm.dmax", f"must be a finite value >= 0, got {dmax}")
        for f in fields[2:]:
            if getattr(self, f) < 0:
                raise InvalidArgument(
                    f"config.renorm.{f}", f"must be >= 0 (0: no warm-up), got {getattr(self, f)}"
                )

    def _validate_normalized_shape(self) -> None:
        shape, name = self.normalized_shape, self.kind.title
        if not shape:
            raise InvalidArgument(
                "config.normalized_shape", f"{name} needs the trailing dims it normalizes, got none"
            )
        if len(shape) > MAX_NORMALIZED_DIMS:
            raise InvalidArgument(
                "config.normalized_shape",
                f"at most {MAX_NORMALIZED_DIMS} dims, got {len(shape)}",
            )
        for i, d in enumerate(shape):
            if d <= 0:
                raise InvalidArgument(f"config.normalized_shape[{i}]", f"must be > 0, got {d}")
        if self.num_features != math.prod(shape):
            raise InvalidArgument(
                "config.num_features",
                f"{name} normalizes {math.prod(shape)} values (the product of normalized_shape "
                f"{list(shape)}); leave num_features 0 or give that, got {self.num_features}",
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
