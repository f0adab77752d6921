"""What the kinds whose statistics are each sample's own share (layer, group, instance, RMS norm).

A sample's statistics depend on that sample alone, so a batch streamed in chunks along dim 0 is
normalized chunk by chunk, each on its own, and the batch's statistics are its chunks' in order.
What the whole batch decides (a running update, torch's rules on how many values a statistic
needs) is decided in ``finish``, once the batch's full shape is known.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from normserve.server.service._config import Mode
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import Normalization, Step

__all__ = ["PerSample"]

#: ``finish``'s word to ``normalize_chunk``: normalize each chunk with its own statistics.
OWN_STATISTICS = "own"


class PerSample(Normalization):
    """A kind whose batch statistics are per sample. Subclasses give the math (``moments``,
    ``apply``), the statistics' shape and the input's rules."""

    @abstractmethod
    def statistics_shape(self, shape: Sequence[int]) -> list[int]:
        """The shape of the batch statistics of an input of ``shape``."""

    @abstractmethod
    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample statistics of ``x`` (which holds values), as an answer reports them."""

    @abstractmethod
    def apply(self, x: torch.Tensor, state: SessionState) -> torch.Tensor:
        """``x`` normalized with its own statistics, then weight and bias; in x's dtype."""

    def check_batch(self, shape: Sequence[int], field: str) -> None:
        """torch's rules on a whole batch normalized with its own statistics (how many values
        a statistic needs); InvalidArgument naming ``field`` if it breaks one."""

    def running(
        self,
        state: SessionState,
        mean: torch.Tensor | None,
        var: torch.Tensor | None,
        shape: Sequence[int],
        n: int,
    ) -> dict[str, torch.Tensor]:
        """The kept statistics after a TRAIN batch of these statistics (None: no values)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no running statistics")

    def apply_running(self, x: torch.Tensor, state: SessionState) -> torch.Tensor:
        """``x`` normalized with the running statistics (a kind that keeps them)."""
        raise NotImplementedError(f"{type(self).__name__} keeps no running statistics")

    def uses_batch_statistics(self, mode: Mode) -> bool:
        return True

    def statistics_numel(self, shape: Sequence[int]) -> int:
        return math.prod(self.statistics_shape(shape))

    def _nan(self, shape: Sequence[int], device: torch.device) -> torch.Tensor:
        """The statistics of a batch without values: undefined, as torch's mean of nothing."""
        return torch.full(
            self.statistics_shape(shape), float("nan"), dtype=torch.float32, device=device
        )

    def _step(
        self,
        state: SessionState,
        mode: Mode,
        out: torch.Tensor | None,
        stats: tuple[torch.Tensor, torch.Tensor] | None,
        shape: Sequence[int],
        device: torch.device,
        n: int,
    ) -> Step:
        if stats is None:
            mean = self._nan(shape, device)
            var = mean.clone()
        else:
            mean, var = stats
        running = None
        if self.updates_running(mode):
            given = stats is not None
            running = self.running(state, mean if given else None, var if given else None, shape, n)
        return Step(out, mean, var, running)

    def forward(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool, n: int
    ) -> Step:
        if not self.uses_batch_statistics(mode):
            mean, var = state.running_mean, state.running_var
            assert mean is not None and var is not None
            out = None if statistics_only else self.apply_running(x, state)
            return Step(out, mean, var)
        self.check_batch(x.shape, "input")
        if x.numel() == 0:
            out = None if statistics_only else torch.empty_like(x)
            return self._step(state, mode, out, None, x.shape, x.device, n)
        out = None if statistics_only else self.apply(x, state)
        return self._step(state, mode, out, self.moments(x), x.shape, x.device, n)

    # ---- a batch in chunks: each chunk's statistics kept in order

    def chunk_statistics(self, x: torch.Tensor, partial: Any) -> Any:
        if x.numel() == 0:
            return partial
        chunks: list[tuple[torch.Tensor, torch.Tensor]] = partial or []
        chunks.append(self.moments(x))
        return chunks

    def finish(
        self, partial: Any, shape: list[int], state: SessionState, mode: Mode, n: int
    ) -> tuple[Step, Any]:
        self.check_batch(shape, "chunk")
        stats = None
        if partial is not None:
            stats = (torch.cat([m for m, _ in partial]), torch.cat([v for _, v in partial]))
        step = self._step(state, mode, None, stats, shape, torch.device("cpu"), n)
        return step, OWN_STATISTICS

    def normalize_chunk(self, x: torch.Tensor, prepared: Any, state: SessionState) -> torch.Tensor:
        if x.numel() == 0:
            return torch.empty_like(x)
        if prepared is None:
            return self.apply_running(x, state)
        # a sample's statistics are its own: the chunk alone gives exactly what the whole
        # batch would (the same kernel on the same values)
        return self.apply(x, state)
