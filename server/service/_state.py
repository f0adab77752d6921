"""A session's state as one immutable value, and the largest values it may hold."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

__all__ = ["MAX_BATCHES_TRACKED", "Adapted", "Calibration", "SessionState"]

#: num_batches_tracked is an int64 on the wire and in torch's state_dict.
MAX_BATCHES_TRACKED = (1 << 63) - 1


@dataclass(frozen=True)
class Calibration:
    """A recalibration in progress (precise batch norm): the exact population statistics of every
    calibration batch so far, each value weighing the same. Per element of the running statistics
    (``[C]``, recurrent batch norm's ``[T, C]``), float64: the count of values, their mean and M2
    (sum of squared deviations), merged with Chan's formula (``ops.merge_moments``)."""

    count: torch.Tensor
    mean: torch.Tensor
    m2: torch.Tensor
    #: calibration batches folded in, and their samples (rows along dim 0)
    batches: int
    samples: int
    #: when StartCalibration was called (Unix seconds)
    start_time: float


@dataclass(frozen=True)
class Adapted:
    """Statistics adapted on live EVAL traffic, kept apart from the running statistics: float32,
    their shape, folded in as the running statistics would be (the session's momentum, or the
    cumulative average without one), starting from the running statistics."""

    mean: torch.Tensor
    var: torch.Tensor
    #: adapting batches folded in
    batches: int


@dataclass(frozen=True)
class SessionState:
    """Everything a call may change. Never mutated: a change commits a new value (see _store)."""

    version: int
    num_batches_tracked: int
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    update_time: float
    #: the session's creation id (SessionRecord.uid): a state of a session re-created under the
    #: same id is not this session's
    uid: str = ""
    #: a frozen session refuses every change of state but UnfreezeSession
    frozen: bool = False
    #: the recalibration in progress (None: none)
    calibration: Calibration | None = None
    #: statistics adapted on EVAL traffic (None: none)
    adapted: Adapted | None = None

    def advanced(self, **changes: object) -> SessionState:
        """The next state: ``changes`` applied, version + 1, update time now."""
        return replace(self, version=self.version + 1, update_time=time.time(), **changes)  # type: ignore[arg-type]
