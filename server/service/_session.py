"""A session: one remote normalization layer, and how calls read and change its state.

The session is kind-agnostic: the math is its kind's (``kinds``), the keeping is its store's
(``_store``). It orders updates and checks everything it would commit.

Concurrency model: state is an immutable snapshot. A call that changes it (a TRAIN batch with
running statistics, reset, import) computes the next snapshot under the session's lock and commits
it to the store with the version it was computed from, so updates are serialized and each is
applied exactly once. A unary TRAIN call runs its one fused kernel (output, statistics and running
update) under the lock: the update must follow the state it was computed from, and one kernel is
cheaper than computing outside and folding in afterwards. A chunked TRAIN batch merges its
statistics without the lock and holds it only to fold them in. Calls that change nothing (EVAL,
batch statistics without tracking) read the current snapshot without locking, so they never wait.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from normserve.server.service._config import Mode, SessionConfig
from normserve.server.service._errors import FailedPrecondition, InvalidArgument, NotFound
from normserve.server.service._state import MAX_BATCHES_TRACKED, SessionState
from normserve.server.service._store import Conflict, StateStore
from normserve.server.service.kinds import Normalization, Step, for_config

if TYPE_CHECKING:
    from normserve.server.service._chunked import ChunkedBatch

__all__ = ["Busy", "NormalizeResult", "Session"]


class Busy(Exception):
    """A non-blocking update found the session's lock taken."""


@dataclass(frozen=True)
class NormalizeResult:
    """What one normalization returns; wait and compute times feed the server's stage metrics."""

    output: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    version: int
    batch_statistics: bool
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0


def _finite(t: torch.Tensor) -> bool:
    if t.device.type == "cpu":  # [C]-sized: numpy's check costs a fraction of torch's
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


class Session:
    """A normalization session. Thread-safe; see the module docstring for the locking model."""

    def __init__(
        self,
        session_id: str,
        config: SessionConfig,
        device: torch.device,
        store: StateStore,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Validates the initial parameters; the state is committed by ``create``."""
        self.session_id = session_id
        self.config = config
        self.device = device
        self.kind: Normalization = for_config(config)
        self.create_time = time.time()
        self._store = store
        self._lock = threading.Lock()
        params: dict[str, torch.Tensor | None] = {"weight": None, "bias": None}
        if config.affine:
            params = dict(self.kind.initial_params(device))
            for key, value, field in (
                ("weight", weight, "config.initial_weight"),
                ("bias", bias, "config.initial_bias"),
            ):
                if value is not None:
                    params[key] = self.kind.check_param(key, value, field).to(device)
        elif weight is not None or bias is not None:
            raise InvalidArgument("config.initial_weight", "needs affine=true")
        running = self.kind.initial(device)
        self._initial = SessionState(
            version=1,
            num_batches_tracked=0,
            running_mean=running.get("running_mean"),
            running_var=running.get("running_var"),
            weight=params["weight"],
            bias=params["bias"],
            update_time=self.create_time,
        )

    def create(self) -> None:
        """Commits the initial state (version 1)."""
        self._store.commit(self.session_id, self._initial, 0)

    def close(self) -> None:
        """Drops the state once an update in flight has committed (deleting a session lets calls
        already running on it finish; later ones see NOT_FOUND)."""
        with self._lock:
            self._store.drop(self.session_id)

    @property
    def state(self) -> SessionState:
        """The current snapshot (never mutated in place)."""
        try:
            return self._store.read(self.session_id)
        except KeyError:
            raise NotFound(f"session {self.session_id!r} was deleted") from None

    def _commit(self, state: SessionState, expected_version: int) -> None:
        try:
            self._store.commit(self.session_id, state, expected_version)
        except Conflict:
            # updates to a session are ordered by its lock: only a delete can intervene
            raise NotFound(
                f"session {self.session_id!r} was deleted during the call; nothing was applied"
            ) from None

    def check_input(self, x: torch.Tensor, field: str = "input") -> None:
        self.kind.check_input(x, field)

    def check_finite_input(self, x: torch.Tensor, field: str) -> None:
        """NaN/Inf in an input normalized with kept statistics (batch statistics reveal them)."""
        if self.config.allow_non_finite:
            return
        # One fast reduction; the elementwise scan runs only if the sum is not finite.
        total = float(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))
        if not math.isfinite(total) and not bool(torch.isfinite(x).all()):
            raise InvalidArgument(field, "contains NaN or Inf; nothing was applied")

    def check_step(self, step: Step, field: str, empty: bool) -> None:
        """Everything returned or kept must be finite as float32: a finite float64 batch can have
        statistics beyond float32's range (values of 1e20: variance 1e40)."""
        if self.config.allow_non_finite:
            return
        if not empty and not (_finite(step.mean.float()) and _finite(step.var.float())):
            raise InvalidArgument(
                field,
                "contains NaN or Inf, or values whose statistics exceed float32's range "
                "(|mean| or variance > 3.4e38); nothing was applied",
            )
        if step.running is not None and not all(_finite(t) for t in step.running.values()):
            raise InvalidArgument(
                field,
                "the running statistics would exceed float32's range; nothing was applied",
            )

    def _next_count(self, s: SessionState) -> int:
        n = s.num_batches_tracked + 1
        if n > MAX_BATCHES_TRACKED:
            raise FailedPrecondition(
                f"session {self.session_id!r}: num_batches_tracked would overflow int64; "
                "reset the session or import a smaller count"
            )
        return n

    # ---- the state transition

    def update(
        self,
        compute: Callable[[SessionState, int], Step],
        field: str,
        empty: bool,
        blocking: bool = True,
    ) -> tuple[Step, int, float]:
        """Computes a step from the current state under the lock, checks it, commits it.
        Returns (step, version after, seconds waited for the lock). Without ``blocking``, raises
        Busy at once if another update holds the lock."""
        t0 = time.perf_counter()
        if not self._lock.acquire(blocking):
            raise Busy(self.session_id)
        try:
            waited = time.perf_counter() - t0
            s = self.state
            n = self._next_count(s)
            step = compute(s, n)
            self.check_step(step, field, empty)  # before the commit: a bad batch changes nothing
            assert step.running is not None
            new = s.advanced(num_batches_tracked=n, **step.running)
            self._commit(new, s.version)
            return step, new.version, waited
        finally:
            self._lock.release()

    def result(
        self, step: Step, version: int, batch: bool, waited: float, t_start: float
    ) -> NormalizeResult:
        """A step as the caller sees it: float32 statistics, the compute time since ``t_start``
        (less the wait for the lock)."""
        if self.device.type == "cuda":
            # Kernels are asynchronous: wait so compute time is the kernels' time, not the launch's.
            torch.cuda.synchronize(self.device)
        mean, var = step.mean, step.var
        if mean.dtype != torch.float32:
            mean, var = mean.float(), var.float()
        compute = time.perf_counter() - t_start - waited
        return NormalizeResult(step.output, mean, var, version, batch, waited, compute)

    # ---- calls

    def normalize(
        self, x: torch.Tensor, mode: Mode, statistics_only: bool = False, blocking: bool = True
    ) -> NormalizeResult:
        """Normalizes one batch; in TRAIN mode (with running statistics) folds it in first.
        Without ``blocking``, raises Busy rather than wait for another update of the session."""
        t0 = time.perf_counter()
        self.check_input(x)
        if x.device != self.device:
            x = x.to(self.device)
        kind = self.kind
        batch = kind.uses_batch_statistics(mode)
        empty = x.numel() == 0
        if kind.updates_running(mode):
            step, version, waited = self.update(
                lambda s, n: kind.forward(x, s, mode, statistics_only, n), "input", empty, blocking
            )
            return self.result(step, version, batch, waited, t0)
        if not batch:
            self.check_finite_input(x, "input")
        state = self.state
        step = kind.forward(x, state, mode, statistics_only, state.num_batches_tracked)
        if batch:
            self.check_step(step, "input", empty)
        return self.result(step, state.version, batch, 0.0, t0)

    def start_batch(self, mode: Mode, statistics_only: bool = False) -> ChunkedBatch:
        """Begins a batch that arrives in chunks along dim 0 (see ChunkedBatch)."""
        from normserve.server.service._chunked import ChunkedBatch  # it builds on Session

        return ChunkedBatch(self, mode, statistics_only)

    def reset(self) -> SessionState:
        """Kept statistics back to their initial values, 0 batches (weight and bias stay)."""
        with self._lock:
            s = self.state
            if not self.config.track_running_stats:
                return s  # nothing tracked, nothing to change
            new = s.advanced(num_batches_tracked=0, **self.kind.initial(self.device))
            self._commit(new, s.version)
            return new

    def state_keys(self) -> list[str]:
        return self.kind.state_keys()

    def export_state(self) -> tuple[OrderedDict[str, torch.Tensor], int]:
        """A torch-compatible state_dict (CPU tensors) and the version it was read at."""
        s = self.state
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key in self.state_keys():
            if key == "num_batches_tracked":
                out[key] = torch.tensor(s.num_batches_tracked, dtype=torch.int64)
            else:
                value = getattr(s, key)
                assert value is not None
                out[key] = value.detach().cpu()
        return out, s.version

    def import_state(self, entries: dict[str, torch.Tensor], strict: bool) -> SessionState:
        """Replaces the state from state_dict entries, all or nothing; no entries, no change."""
        allowed = self.state_keys()
        for key in entries:
            if key not in allowed:
                raise InvalidArgument(
                    f"entries[{key!r}]",
                    f"unexpected key; this session's state_dict keys are {allowed}",
                )
        missing = [k for k in allowed if k not in entries]
        if strict and missing:
            raise InvalidArgument("entries", f"missing keys {missing} (strict import)")
        new: dict[str, object] = {}
        for key, value in entries.items():
            field = f"entries[{key!r}]"
            if key == "num_batches_tracked":
                if (
                    value.dtype != torch.int64
                    or value.dim() != 0
                    or not 0 <= int(value) < MAX_BATCHES_TRACKED
                ):
                    raise InvalidArgument(
                        field, f"expected an int64 scalar in [0, {MAX_BATCHES_TRACKED})"
                    )
                new[key] = int(value)
            else:
                new[key] = self.kind.check_param(key, value, field).to(self.device)
        with self._lock:
            s = self.state
            if not new:
                return s
            state = s.advanced(**new)
            self._commit(state, s.version)
            return state
