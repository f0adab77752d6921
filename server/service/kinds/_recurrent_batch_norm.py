"""Recurrent batch norm (Cooijmans et al. 2016): batch norm with a slot of running statistics per
time step, weight and bias shared; each batch names its step, steps past the last slot share it.

State: running_mean and running_var of shape [T, C] (row t: slot t), num_batches_tracked counting
every TRAIN batch of the session. ``at(t)`` gives the kind as a batch of step t sees it: batch
norm over slot min(t, T - 1), whose TRAIN update rewrites that row only.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from normserve.server.service._config import Mode
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._state import SessionState
from normserve.server.service.kinds._base import Normalization, Step
from normserve.server.service.kinds._batch_norm import BatchNorm

__all__ = ["RecurrentBatchNorm"]

_RUNNING = ("running_mean", "running_var")


class RecurrentBatchNorm(BatchNorm):
    """T slots of batch norm's running statistics; every call goes through ``at``."""

    def shape_of(self, key: str) -> tuple[int, ...]:
        if key in _RUNNING:
            return (self.config.time_steps, self.config.num_features)
        return (self.config.num_features,)

    def initial(self, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.config.track_running_stats:
            return {}
        shape = self.shape_of("running_mean")
        return {
            "running_mean": torch.zeros(shape, dtype=torch.float32, device=device),
            "running_var": torch.ones(shape, dtype=torch.float32, device=device),
        }

    def at(self, time_step: int) -> Normalization:
        if time_step < 0:
            raise InvalidArgument("time_step", f"must be >= 0, got {time_step}")
        return _Slot(self.config, min(time_step, self.config.time_steps - 1))


class _Slot(RecurrentBatchNorm):
    """Batch norm over one slot: the state seen through its row, updates written back to it."""

    def __init__(self, config: Any, slot: int) -> None:
        super().__init__(config)
        self.slot = slot

    def at(self, time_step: int) -> Normalization:  # pragma: no cover - sessions call the kind's
        raise AssertionError("a slot is already one time step's")

    def view(self, state: SessionState) -> SessionState:
        if state.running_mean is None or state.running_var is None:
            return state
        return replace(
            state,
            running_mean=state.running_mean[self.slot],
            running_var=state.running_var[self.slot],
        )

    def _embed(self, state: SessionState, step: Step) -> Step:
        if step.running is None:
            return step
        running = {}
        for key in _RUNNING:
            whole = getattr(state, key).clone()
            whole[self.slot] = step.running[key]
            running[key] = whole
        return replace(step, running=running)

    def forward(
        self, x: torch.Tensor, state: SessionState, mode: Mode, statistics_only: bool, n: int
    ) -> Step:
        return self._embed(state, super().forward(x, self.view(state), mode, statistics_only, n))

    def finish(
        self, partial: Any, shape: list[int], state: SessionState, mode: Mode, n: int
    ) -> tuple[Step, Any]:
        step, prepared = super().finish(partial, shape, self.view(state), mode, n)
        return self._embed(state, step), prepared

    def normalize_chunk(self, x: torch.Tensor, prepared: Any, state: SessionState) -> torch.Tensor:
        return super().normalize_chunk(x, prepared, self.view(state))
