"""A session's state as one immutable value, and the largest values it may hold."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

__all__ = ["MAX_BATCHES_TRACKED", "SessionState"]

#: num_batches_tracked is an int64 on the wire and in torch's state_dict.
MAX_BATCHES_TRACKED = (1 << 63) - 1


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

    def advanced(self, **changes: object) -> SessionState:
        """The next state: ``changes`` applied, version + 1, update time now."""
        return replace(self, version=self.version + 1, update_time=time.time(), **changes)  # type: ignore[arg-type]
