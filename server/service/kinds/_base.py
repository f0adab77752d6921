"""The interface a normalization kind implements for the session machinery.

A kind owns its math (through ``normserve.server.ops``) and the shape of what it keeps between
batches; the session owns ordering, validation of what is stored, and commits. Adding a kind
(layer, group, instance, RMS norm, batch renorm, ghost batch norm) is one module here plus one
entry in ``kinds.KINDS``; the session and the transport stay as they are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from normserve.server.service._config import Mode, SessionConfig
from normserve.server.service._state import SessionState

__all__ = ["Normalization", "Step"]


@dataclass(frozen=True)
class Step:
    """What one batch produced: its output (None for statistics only), the statistics it was
    normalized with, and the running tensors to commit (None when it changes nothing kept)."""

    output: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    running: dict[str, torch.Tensor] | None = None


class Normalization(ABC):
    """One kind of normalization for one session config. Stateless: state comes in and goes out
    as values. ``n`` below is num_batches_tracked after the batch (torch increments it first)."""

    def __init__(self, config: SessionConfig) -> None:
        self.config = config

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
    def check_param(self, key: str, value: torch.Tensor, field: str) -> torch.Tensor:
        """A state entry (weight, bias, running statistics) as the session stores it, or
        InvalidArgument naming ``field``."""

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
