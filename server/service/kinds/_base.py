"""The interface a normalization kind implements for the session machinery.

A kind owns its math (through ``normserve.server.ops``) and the shape of what it keeps between
batches; the session owns ordering, validation of what is stored, and commits. Adding a kind
(layer, group, instance, RMS norm, batch renorm, ghost batch norm, ...) is one module here plus one
entry in ``kinds.KINDS``; the session and the transport stay as they are.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from normserve.server.service._config import Mode, SessionConfig
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._state import SessionState

__all__ = ["FLOAT_DTYPES", "Normalization", "Step", "describe"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class Step:
    """What one batch produced: its output (None for statistics only), the statistics it was
    normalized with, and the running tensors to commit (None when it changes nothing kept)."""

    output: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    running: dict[str, torch.Tensor] | None = None
    #: how many batches the update counts in num_batches_tracked, where a kind counts other than
    #: one per call (ghost batch norm: one per virtual batch); None: the kind's usual count
    batches: int | None = None


class Normalization(ABC):
    """One kind of normalization for one session config. Stateless: state comes in and goes out
    as values. ``n`` below is num_batches_tracked after the batch (torch increments it first)."""

    #: Whether a TRAIN update counts in num_batches_tracked (torch's InstanceNorm never does).
    counts_batches: ClassVar[bool] = True

    def __init__(self, config: SessionConfig) -> None:
        self.config = config

    @property
    def eps(self) -> float:
        """The eps the kind adds to variances (a config's unset eps resolved)."""
        return self.config.resolved_eps

    def shape_of(self, key: str) -> tuple[int, ...]:
        """The shape of a kept tensor (weight, bias, running statistics): per channel unless a
        kind says otherwise."""
        return (self.config.num_features,)

    def statistics_numel(self, shape: Sequence[int]) -> int:
        """How many values each of an answer's mean and var has, for an input of ``shape``."""
        return self.config.num_features

    def check_param(self, key: str, value: torch.Tensor, field: str) -> torch.Tensor:
        """A state entry (weight, bias, running statistics) as the session stores it (float32 of
        ``shape_of(key)``), or InvalidArgument naming ``field``."""
        if value.dtype not in FLOAT_DTYPES:
            raise InvalidArgument(field, f"expected a floating-point tensor, got {value.dtype}")
        shape = self.shape_of(key)
        if tuple(value.shape) != shape:
            raise InvalidArgument(
                field, f"expected shape {describe(shape)}, got {describe(value.shape)}"
            )
        stored = value.to(dtype=torch.float32)
        # checked as stored: a finite float64 1e39 is inf in float32
        if not bool(torch.isfinite(stored).all()):
            raise InvalidArgument(
                field, "contains NaN or Inf, or values beyond float32's range (|x| > 3.4e38)"
            )
        if key == "running_var" and bool((stored < 0).any()):
            raise InvalidArgument(field, "variances must be >= 0")
        return stored

    def state_bytes(self) -> int:
        """Bytes of the kept state: float32 tensors, the batch count an int64."""
        return sum(
            8 if key == "num_batches_tracked" else 4 * math.prod(self.shape_of(key))
            for key in self.state_keys()
        )

    @staticmethod
    def check_dtype(x: torch.Tensor, field: str) -> None:
        if x.dtype not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"{field}.dtype",
                f"expected float32, float16, bfloat16 or float64, got {str(x.dtype)[6:]}",
            )

    def at(self, time_step: int) -> Normalization:
        """The kind as a batch of ``time_step`` sees it: itself, for every kind but recurrent
        batch norm (which keeps a slot per step); a time step it does not read is refused."""
        if time_step:
            raise InvalidArgument(
                "time_step",
                f"only recurrent batch norm reads it, not {self.config.kind.title}; "
                f"leave it 0, got {time_step}",
            )
        return self

    def view(self, state: SessionState) -> SessionState:
        """The state as this kind's batches see it (recurrent batch norm's slot: one row of its
        running statistics); what a batch without statistics of its own is answered with."""
        return state

    @abstractmethod
    def state_keys(self) -> list[str]:
        """torch's state_dict keys for this config, in torch's order."""

    @abstractmethod
    def initial(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The kept tensors of a fresh (or reset) session, without weight and bias."""

    @abstractmethod
    def initial_params(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Default weight and bias (used with affine=true when none are given)."""

    @abstractmethod
    def check_input(self, x: torch.Tensor, field: str) -> None:
        """Rank, channels and dtype of an input, or InvalidArgument naming ``field``."""

    @abstractmethod
    def uses_batch_statistics(self, mode: Mode) -> bool:
        """Whether a batch in ``mode`` is normalized with its own statistics."""

    def updates_running(self, mode: Mode) -> bool:
        """Whether a batch in ``mode`` changes the kept statistics (and so must be ordered)."""
        return mode is Mode.TRAIN and self.config.track_running_stats

    @abstractmethod
    def forward(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool, n: int
    ) -> Step:
        """One whole batch."""

    def prepare_update(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool
    ) -> Callable[[SessionState, int], Step] | None:
        """A TRAIN update's work over the batch, done now from ``state`` (a snapshot read without
        the session's lock), so that calls to one session compute in parallel; returns the fold
        that, under the lock, completes the step against the state it commits to (``n`` as in
        ``forward``): only the [C]-sized running update. None: the kind does it all under the
        lock in ``forward`` (its output depends on the running statistics, as batch renorm's).
        The fold must equal ``forward`` on the state it is given."""
        return None

    # ---- a batch that arrives in chunks along dim 0

    @abstractmethod
    def chunk_statistics(self, x: torch.Tensor, partial: Any) -> Any:
        """``partial`` (None at the first chunk) with chunk ``x`` folded in."""

    @abstractmethod
    def finish(
        self, partial: Any, shape: list[int], state: SessionState, mode: Mode, n: int
    ) -> tuple[Step, Any]:
        """The statistics of the whole batch (``shape`` its full shape) and its running update,
        with no output; and what ``normalize_chunk`` needs to make the output chunk by chunk."""

    @abstractmethod
    def normalize_chunk(self, x: torch.Tensor, prepared: Any, state: SessionState) -> torch.Tensor:
        """One output chunk: with the batch's statistics (``prepared`` from ``finish``), or with
        the kept ones (``prepared`` None: a batch that needs no statistics of its own)."""
