"""A session: one remote normalization layer, and how calls read and change its state.

The session is kind-agnostic: the math is its kind's (``kinds``), the keeping is its store's
(``stores``). It orders updates and checks everything it would commit.

Concurrency model: state is an immutable snapshot. A call that changes it (a TRAIN batch with
running statistics, reset, import) computes the next snapshot under the session's lock and commits
it to the store with the version it was computed from, so updates are serialized and each is
applied exactly once. A unary TRAIN call runs its one fused kernel (output, statistics and running
update) under the lock: the update must follow the state it was computed from, and one kernel is
cheaper than computing outside and folding in afterwards. A chunked TRAIN batch merges its
statistics without the lock and holds it only to fold them in. Calls that change nothing (EVAL,
batch statistics without tracking) read the current snapshot without locking, so they never wait.

Across processes (a shared store), the lock orders only this process's updates: an update starts
from the latest state this process knows and commits with compare-and-set; when another process
committed first, it is computed again from the state the store returns (``Conflict``). An update
with an idempotency key that the store has seen applied is answered with that update's version
and changes nothing; the batch's own statistics and output are recomputed from the request, so
the answer equals the first.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from normserve.server import ops
from normserve.server.service import _calibration as cal
from normserve.server.service import _device
from normserve.server.service._calibration import Adaptation
from normserve.server.service._config import Mode, SessionConfig
from normserve.server.service._errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from normserve.server.service._state import (
    MAX_BATCHES_TRACKED,
    Adapted,
    Calibration,
    SessionState,
)
from normserve.server.service.kinds import Normalization, Step, for_config
from normserve.server.service.stores import (
    AlreadyApplied,
    Conflict,
    Idempotency,
    SessionRecord,
    StateStore,
    Ticket,
    fingerprint,
)

if TYPE_CHECKING:
    from normserve.server.service._chunked import ChunkedBatch

__all__ = ["MAX_CONFLICTS", "Busy", "NormalizeResult", "Session"]

#: Compare-and-set attempts of one update before it gives up (ABORTED: safe to retry). Each retry
#: follows another process's commit, so this many in a row means a session under heavy contention.
MAX_CONFLICTS = 64


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
    #: the idempotency key had been applied: this answers that call, nothing was applied now
    replayed: bool = False
    #: completes once the change is durable (None: it is); the answer waits for it
    durable: Ticket = None


_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,128}")


def check_idempotency_key(key: str) -> None:
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidArgument(
            "idempotency_key",
            f"must be 1-128 printable ASCII characters without spaces (a UUID), got "
            f"{len(key)} characters",
        )


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
        *,
        key: str = "",
        ttl_seconds: float = 0.0,
        record: SessionRecord | None = None,
    ) -> None:
        """Validates the initial parameters; the state is committed by ``create``. With
        ``record``, the session already exists in the store (created by another process, or
        before a restart): nothing is validated or committed. ``key`` is its key in the store
        (the id by default)."""
        self.session_id = session_id
        self.key = key or session_id
        self.config = config
        self.device = device
        self.kind: Normalization = for_config(config)
        self._store = store
        self._lock = threading.Lock()
        #: when this process last used the session (the idle TTL of stores that do not keep it)
        self.last_used = time.time()
        #: called when the store no longer has the session (another process deleted it)
        self.on_gone: Callable[[Session], object] | None = None
        #: the ticket of the store's creation (the answer to a create waits for it)
        self.created: Ticket = None
        if record is not None:
            self.record = record
            self.create_time = record.create_time
            return
        self.create_time = time.time()
        self.record = SessionRecord(config, self.create_time, uuid.uuid4().hex, ttl_seconds)
        params: dict[str, torch.Tensor] = {}
        if config.affine:
            params = dict(self.kind.initial_params(device))
            for key, value, field in (
                ("weight", weight, "config.initial_weight"),
                ("bias", bias, "config.initial_bias"),
            ):
                if value is None:
                    continue
                if key not in params:  # layer norm with bias=false; RMS norm
                    raise InvalidArgument(
                        field, f"this {config.kind.title} session has no {key} to initialize"
                    )
                params[key] = self.kind.check_param(key, value, field).to(device)
        elif weight is not None or bias is not None:
            raise InvalidArgument("config.initial_weight", "needs affine=true")
        running = self.kind.initial(device)
        self._initial = SessionState(
            version=1,
            num_batches_tracked=0,
            running_mean=running.get("running_mean"),
            running_var=running.get("running_var"),
            weight=params.get("weight"),
            bias=params.get("bias"),
            update_time=self.create_time,
            uid=self.record.uid,
        )

    @property
    def ttl_seconds(self) -> float:
        return self.record.ttl_seconds

    def expire_time(self) -> float | None:
        """When the session expires unless used before (None: never)."""
        if not self.record.ttl_seconds:
            return None
        kept = self._store.expire_time(self.key)
        return kept if kept is not None else self.last_used + self.record.ttl_seconds

    def create(self) -> Ticket:
        """Stores the record and the initial state (version 1); Conflict if the key is taken."""
        return self._store.create(self.key, self.record, self._initial)

    def close(self) -> Ticket:
        """Drops the state once an update in flight has committed (deleting a session lets calls
        already running on it finish; later ones see NOT_FOUND)."""
        with self._lock:
            return self._store.drop(self.key)

    def _gone(self) -> NotFound:
        if self.on_gone is not None:
            self.on_gone(self)
        return NotFound(f"session {self.session_id!r} was deleted (or expired)")

    def _mine(self, s: SessionState) -> SessionState:
        """``s`` if it is this session's (not a session re-created under its id elsewhere), on
        this session's device."""
        if s.uid != self.record.uid:
            raise self._gone()
        # a state's tensors are together on one device: one of them tells (a kind may keep
        # weights without running statistics, or neither)
        probe = s.running_mean if s.running_mean is not None else s.weight
        if probe is not None and probe.device != self.device:
            moved: dict[str, torch.Tensor | None] = {}
            for k in ("running_mean", "running_var", "weight", "bias"):
                t = getattr(s, k)
                moved[k] = None if t is None else t.to(self.device)
            s = replace(s, **moved)  # type: ignore[arg-type]
        if s.adapted is not None and s.adapted.mean.device != self.device:
            a = s.adapted
            s = replace(
                s, adapted=Adapted(a.mean.to(self.device), a.var.to(self.device), a.batches)
            )
        return s

    def read_state(self, touch: bool = True) -> SessionState:
        """The current snapshot (never mutated in place); ``touch``: as a use of the session
        (for stores that keep the idle TTL themselves; this process counts a use only once a call
        succeeds, see ``touch``: a refused call changes nothing, its expiry included)."""
        try:
            return self._mine(self._store.read(self.key, touch))
        except KeyError:
            raise self._gone() from None

    def _latest(self) -> SessionState:
        """The state an update would start from, without a round trip to a shared store."""
        try:
            return self._mine(self._store.latest(self.key))
        except KeyError:
            raise self._gone() from None

    def touch(self) -> None:
        """Counts a successful call as a use (the idle TTL starts again)."""
        self.last_used = time.time()

    @property
    def state(self) -> SessionState:
        """The current snapshot, read as a use of the session."""
        return self.read_state(True)

    def _transition(
        self,
        compute: Callable[[SessionState], SessionState],
        idempotency: Idempotency | None = None,
    ) -> tuple[SessionState, SessionState, Ticket | AlreadyApplied]:
        """Under the lock: the state an update starts from, the state it commits, and the
        commit's ticket (or the AlreadyApplied of a replayed idempotency key). Recomputes after a
        Conflict (another process committed first). ``compute`` may raise to change nothing."""
        s = self._latest()
        fresh = not self._store.shared  # a shared store's latest may be this process's last view
        for _ in range(MAX_CONFLICTS):
            try:
                new = compute(s)
            except (FailedPrecondition, _Same):
                if idempotency is not None:
                    # a retry of an update that was applied before the session was frozen (or
                    # started calibrating, ...): answered as applied, not refused
                    applied = self._store.applied(self.key, idempotency.key)
                    if applied is not None:
                        self.touch()
                        return s, s, AlreadyApplied(applied)
                if fresh:
                    raise
                # a refusal (or a no-op) decided on a view that another process may have moved
                # past (frozen, calibrating, adapted): decide again on the store's current state
                fresh = True
                try:
                    current = self._mine(self._store.read(self.key, touch=False))
                except KeyError:
                    raise self._gone() from None
                if current.version == s.version:
                    raise
                s = current
                continue
            # on CUDA: the new state's kernels have run before another thread can read it
            _device.wait(self.device)
            try:
                ticket = self._store.commit(self.key, new, s.version, idempotency)
                self.touch()
                return s, new, ticket
            except AlreadyApplied as applied:
                self.touch()
                return s, s, applied
            except Conflict as conflict:
                if conflict.current is None:
                    raise NotFound(
                        f"session {self.session_id!r} was deleted during the call; nothing was "
                        "applied"
                    ) from None
                s = self._mine(conflict.current)
                fresh = True
        raise Aborted(
            f"session {self.session_id!r}: {MAX_CONFLICTS} updates from other processes won "
            "the race for this one; nothing was applied, retry"
        )

    def _commit(
        self, compute: Callable[[SessionState], SessionState]
    ) -> tuple[SessionState, Ticket]:
        """An update without idempotency (reset, import): the state committed and its ticket."""
        _, new, ticket = self._transition(compute)
        assert not isinstance(ticket, AlreadyApplied)
        return new, ticket

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

    def _next_count(self, s: SessionState, batches: int = 1) -> int:
        n = s.num_batches_tracked + batches
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
        idempotency: Idempotency | None = None,
    ) -> tuple[Step, int, float, Ticket, bool]:
        """Computes a step from the current state under the lock, checks it, commits it.
        Returns (step, version after, seconds waited for the lock, the commit's ticket, whether
        the idempotency key had been applied: then nothing was, and the version is that call's).
        Without ``blocking``, raises Busy at once if another update holds the lock."""
        t0 = time.perf_counter()
        if not self._lock.acquire(blocking):
            raise Busy(self.session_id)
        try:
            waited = time.perf_counter() - t0
            steps: list[Step] = []

            def next_state(s: SessionState) -> SessionState:
                self._check_trainable(s)
                n = self._next_count(s) if self.kind.counts_batches else s.num_batches_tracked
                step = compute(s, n)
                self.check_step(
                    step, field, empty
                )  # before the commit: a bad batch changes nothing
                steps.append(step)
                assert step.running is not None
                if step.batches is not None:
                    n = self._next_count(s, step.batches)
                return s.advanced(num_batches_tracked=n, **step.running)

            before, new, ticket = self._transition(next_state, idempotency)
            if isinstance(ticket, AlreadyApplied):
                assert idempotency is not None
                applied = ticket.applied
                if applied.fingerprint != idempotency.fingerprint:
                    raise InvalidArgument(
                        "idempotency_key",
                        f"{idempotency.key!r} was applied to another request ({applied.fingerprint}"
                        f"; this one is {idempotency.fingerprint}): every call needs a key of its "
                        "own; nothing was applied",
                    )
                if not steps:  # refused before computing (frozen, calibrating): the batch's
                    # own answer, computed from the request as a first try would have
                    steps.append(compute(before, before.num_batches_tracked + 1))
                return steps[-1], applied.version, waited, None, True
            return steps[-1], new.version, waited, ticket, False
        finally:
            self._lock.release()

    def result(
        self,
        step: Step,
        version: int,
        batch: bool,
        waited: float,
        t_start: float,
        replayed: bool = False,
        durable: Ticket = None,
    ) -> NormalizeResult:
        """A step as the caller sees it: float32 statistics, the compute time since ``t_start``
        (less the wait for the lock)."""
        mean, var = step.mean, step.var
        if mean.dtype != torch.float32:
            mean, var = mean.float(), var.float()
        output = step.output
        if self.device.type == "cuda":
            # into pinned host memory, waiting for this call's stream only (not the device): so
            # compute time is the kernels' time, not the launch's
            output, mean, var = _device.to_host(output, mean, var)  # type: ignore[assignment]
        compute = time.perf_counter() - t_start - waited
        self.touch()
        return NormalizeResult(
            output, mean, var, version, batch, waited, compute, replayed, durable
        )

    # ---- calls

    def normalize(
        self,
        x: torch.Tensor,
        mode: Mode,
        statistics_only: bool = False,
        blocking: bool = True,
        idempotency_key: str = "",
        time_step: int = 0,
        adaptation: Adaptation | None = None,
    ) -> NormalizeResult:
        """Normalizes one batch; in TRAIN mode (with running statistics) folds it in first, once
        per idempotency key; a CALIBRATE batch or an adapting EVAL batch: see ``calibrate`` and
        ``adapt``. Without ``blocking``, raises Busy rather than wait for another update of the
        session."""
        t0 = time.perf_counter()
        self.check_input(x)
        self.check_unsynchronized(mode, "sync")
        kind = self.kind.at(time_step)
        if x.device != self.device:
            x = _device.to_device(x, self.device)
        if adaptation is not None:
            return self.adapt(
                x, mode, adaptation, statistics_only, blocking, idempotency_key, t0, time_step
            )
        if mode is Mode.CALIBRATE:
            return self.calibrate(x, statistics_only, blocking, idempotency_key, t0, time_step)
        batch = kind.uses_batch_statistics(mode)
        empty = x.numel() == 0
        if kind.updates_running(mode):
            idem = self.idempotency(idempotency_key, mode, x, statistics_only, -1, time_step)
            # When another update holds the lock, a worker thread does the batch's work before
            # taking it, so calls to one session compute in parallel and the lock orders only
            # the [C]-sized running update. Uncontended, the one fused kernel runs under the
            # lock: it is cheaper, and its running statistics are torch's to the bit (the split
            # rounds the batch mean to float32 first: a few ulps). Non-blocking calls run
            # inline, on the event loop: nothing to overlap there.
            fold = (
                kind.prepare_update(x, self._latest(), mode, statistics_only)
                if blocking and self._lock.locked()
                else None
            )
            step, version, waited, ticket, replayed = self.update(
                fold or (lambda s, n: kind.forward(x, s, mode, statistics_only, n)),
                "input",
                empty,
                blocking,
                idem,
            )
            return self.result(step, version, batch, waited, t0, replayed, ticket)
        if not batch:
            self.check_finite_input(x, "input")
        state = self.state
        step = kind.forward(x, state, mode, statistics_only, state.num_batches_tracked)
        if batch:
            self.check_step(step, "input", empty)
        return self.result(step, state.version, batch, 0.0, t0)

    def check_unsynchronized(self, mode: Mode, field: str) -> None:
        """A synchronized session's TRAIN batches come through its group's rendezvous only."""
        if mode is Mode.TRAIN and self.config.sync_participants:
            raise InvalidArgument(
                field,
                f"session {self.session_id!r} is synchronized over "
                f"{self.config.sync_participants} participants: a TRAIN call must name its rank "
                "and step (NormalizeRequest.sync, or NormalizeStreamRequest.sync on a stream)",
            )

    @staticmethod
    def idempotency(
        key: str,
        mode: Mode,
        x: torch.Tensor | None,
        statistics_only: bool,
        rows: int = -1,
        time_step: int = 0,
    ) -> Idempotency | None:
        """An update's idempotency (None without a key); the fingerprint names what the request
        asked (mode, with a recurrent batch's time step; dtype, shape), so a key reused for
        another request is told apart."""
        if not key:
            return None
        check_idempotency_key(key)
        # "train@3": only a nonzero step shows, so every other fingerprint stays as it was
        what = f"{mode.value}@{time_step}" if time_step else mode.value
        if x is None:
            return Idempotency(key, f"{what}:stream:{int(statistics_only)}")
        shape = [rows if rows >= 0 else x.shape[0], *x.shape[1:]]
        return Idempotency(key, fingerprint(what, str(x.dtype)[6:], shape, statistics_only))

    def start_batch(
        self,
        mode: Mode,
        statistics_only: bool = False,
        idempotency_key: str = "",
        time_step: int = 0,
        adaptation: Adaptation | None = None,
    ) -> ChunkedBatch:
        """Begins a batch that arrives in chunks along dim 0 (see ChunkedBatch). A calibration
        or accumulating adaptation batch that the session would refuse now is refused at its
        first chunk (the same refusal as at its end, where it is decided again)."""
        from normserve.server.service._chunked import ChunkedBatch  # it builds on Session

        self.check_unsynchronized(mode, "mode")
        if adaptation is not None:
            self.check_adaptation(mode, adaptation)
            if adaptation.accumulate:
                self._check_unfrozen(
                    self.read_state(touch=False), "fold EVAL batches into adapted statistics"
                )
        elif mode is Mode.CALIBRATE:
            cal.check_supported(self.session_id, self.config, "a MODE_CALIBRATE batch")
            self._check_calibratable(self.read_state(touch=False))
        return ChunkedBatch(
            self, mode, statistics_only, idempotency_key, time_step, adaptation=adaptation
        )

    def reset(self) -> tuple[SessionState, Ticket]:
        """Kept statistics back to their initial values, 0 batches (weight and bias stay)."""
        with self._lock:
            if not self.config.track_running_stats:
                self.touch()
                return self.state, None  # nothing tracked, nothing to change
            initial = self.kind.initial(self.device)

            def reset(s: SessionState) -> SessionState:
                self._check_unfrozen(s, "reset")
                return s.advanced(num_batches_tracked=0, **initial)

            return self._commit(reset)

    def state_keys(self) -> list[str]:
        return self.kind.state_keys()

    def export_state(self) -> tuple[OrderedDict[str, torch.Tensor], int]:
        """A torch-compatible state_dict (CPU tensors) and the version it was read at."""
        s = self.read_state(touch=False)  # a read, as GetSession: not a use
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key in self.state_keys():
            if key == "num_batches_tracked":
                out[key] = torch.tensor(s.num_batches_tracked, dtype=torch.int64)
            else:
                value = getattr(s, key)
                assert value is not None
                out[key] = value.detach().cpu()
        return out, s.version

    def import_state(
        self, entries: dict[str, torch.Tensor], strict: bool
    ) -> tuple[SessionState, Ticket]:
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
            if not new:
                self.touch()
                return self.state, None

            def load(s: SessionState) -> SessionState:
                self._check_unfrozen(s, "import state")
                return s.advanced(**new)

            return self._commit(load)

    # ---- freezing, recalibration and adaptation (their math: _calibration)

    def _check_unfrozen(self, s: SessionState, what: str) -> None:
        if s.frozen:
            raise FailedPrecondition(
                f"session {self.session_id!r} is frozen: it refuses to {what}; unfreeze it "
                f"first (UnfreezeSession; `normserve session unfreeze {self.session_id}`)"
            )

    def _check_trainable(self, s: SessionState) -> None:
        self._check_unfrozen(s, "apply TRAIN updates")
        if s.calibration is not None:
            raise FailedPrecondition(
                f"session {self.session_id!r} is calibrating: TRAIN updates are refused until "
                "CommitCalibration or AbortCalibration (`normserve session calibrate-commit|"
                f"calibrate-abort {self.session_id}`)"
            )

    def _calibrating(self, s: SessionState, what: str) -> Calibration:
        if s.calibration is None:
            raise FailedPrecondition(
                f"session {self.session_id!r} is not calibrating: {what} needs StartCalibration "
                f"first (`normserve session calibrate-start {self.session_id}`)"
            )
        return s.calibration

    def _change(
        self, compute: Callable[[SessionState], SessionState]
    ) -> tuple[SessionState, Ticket]:
        """A change of state under the lock; ``compute`` raises _Same to change nothing."""
        with self._lock:
            try:
                return self._commit(compute)
            except _Same as same:
                self.touch()
                return same.state, None

    def _locked_transition(
        self,
        compute: Callable[[SessionState], SessionState],
        idempotency: Idempotency | None,
        blocking: bool,
    ) -> tuple[SessionState, SessionState, Ticket, bool, int, float]:
        """``_transition`` under the lock, an applied idempotency key checked: (state before,
        state after, ticket, replayed, version, seconds waited for the lock)."""
        t0 = time.perf_counter()
        if not self._lock.acquire(blocking):
            raise Busy(self.session_id)
        try:
            waited = time.perf_counter() - t0
            before, new, ticket = self._transition(compute, idempotency)
        finally:
            self._lock.release()
        if isinstance(ticket, AlreadyApplied):
            assert idempotency is not None
            applied = ticket.applied
            if applied.fingerprint != idempotency.fingerprint:
                raise InvalidArgument(
                    "idempotency_key",
                    f"{idempotency.key!r} was applied to another request ({applied.fingerprint}; "
                    f"this one is {idempotency.fingerprint}): every call needs a key of its own; "
                    "nothing was applied",
                )
            return before, new, None, True, applied.version, waited
        return before, new, ticket, False, new.version, waited

    def set_frozen(self, frozen: bool) -> tuple[SessionState, Ticket]:
        """Freezes (or unfreezes) the session: one change of state, version + 1; nothing when it
        already is."""

        def compute(s: SessionState) -> SessionState:
            if s.frozen == frozen:
                raise _Same(s)
            return s.advanced(frozen=frozen)

        return self._change(compute)

    def start_calibration(self) -> tuple[SessionState, Ticket]:
        """Begins a recalibration: an empty accumulator, the running statistics untouched."""
        cal.check_supported(self.session_id, self.config, "calibration")

        def compute(s: SessionState) -> SessionState:
            self._check_unfrozen(s, "start a calibration")
            if s.calibration is not None:
                raise FailedPrecondition(
                    f"session {self.session_id!r} is already calibrating "
                    f"({s.calibration.batches} batches so far); CommitCalibration or "
                    "AbortCalibration first"
                )
            assert s.running_mean is not None
            return s.advanced(calibration=cal.new_calibration(s.running_mean, time.time()))

        return self._change(compute)

    def commit_calibration(self) -> tuple[SessionState, Ticket]:
        """Replaces the running statistics with the accumulated population ones, atomically."""

        def compute(s: SessionState) -> SessionState:
            self._check_unfrozen(s, "commit a calibration")
            c = self._calibrating(s, "CommitCalibration")
            mean, var = cal.committed(self.session_id, c, s)
            if not (_finite(mean.cpu()) and _finite(var.cpu())):
                raise FailedPrecondition(
                    f"session {self.session_id!r}: the calibrated statistics exceed float32's "
                    "range (|mean| or variance > 3.4e38); nothing was applied"
                )
            return s.advanced(running_mean=mean, running_var=var, calibration=None)

        return self._change(compute)

    def abort_calibration(self) -> tuple[SessionState, Ticket]:
        """Discards the accumulator; the running statistics stay as they were."""

        def compute(s: SessionState) -> SessionState:
            self._check_unfrozen(s, "abort a calibration")
            self._calibrating(s, "AbortCalibration")
            return s.advanced(calibration=None)

        return self._change(compute)

    def calibrate(
        self,
        x: torch.Tensor,
        statistics_only: bool,
        blocking: bool,
        idempotency_key: str,
        t0: float,
        time_step: int = 0,
    ) -> NormalizeResult:
        """A MODE_CALIBRATE batch: normalized with its own statistics, its exact moments merged
        into the accumulator (once per idempotency key)."""
        cal.check_supported(self.session_id, self.config, "a MODE_CALIBRATE batch")
        self.check_finite_input(x, "input")
        m = cal.batch_moments(x)
        idem = self.idempotency(idempotency_key, Mode.CALIBRATE, x, statistics_only, -1, time_step)
        new, version, waited, replayed, ticket = self.fold_calibration(
            m, x.shape[0], idem, blocking, time_step
        )
        out = None
        if not statistics_only:
            out = ops.normalize_batch(x, m, new.weight, new.bias, self.kind.eps, ops.batch_shift(m))
        step = Step(out, m.mean, m.var)
        return self.result(step, version, True, waited, t0, replayed, ticket)

    def fold_calibration(
        self,
        m: ops.Moments,
        rows: int,
        idempotency: Idempotency | None,
        blocking: bool,
        time_step: int = 0,
    ) -> tuple[SessionState, int, float, bool, Ticket]:
        """Merges a calibration batch's moments (``rows`` samples) into the accumulator, once per
        idempotency key: (the state after, version, seconds waited, replayed, ticket)."""
        slot = cal.slot_of(self.config, time_step)

        def compute(s: SessionState) -> SessionState:
            self._check_unfrozen(s, "fold in calibration batches")
            c = self._calibrating(s, "a MODE_CALIBRATE batch")
            return s.advanced(calibration=cal.fold(c, m, slot, rows))

        _, new, ticket, replayed, version, waited = self._locked_transition(
            compute, idempotency, blocking
        )
        return new, version, waited, replayed, ticket

    def _check_calibratable(self, s: SessionState) -> None:
        self._check_unfrozen(s, "fold in calibration batches")
        self._calibrating(s, "a MODE_CALIBRATE batch")

    def check_adaptation(self, mode: Mode, adaptation: Adaptation) -> None:
        """What an adapting batch is refused for before its statistics are computed."""
        if mode is not Mode.EVAL:
            raise InvalidArgument(
                "adaptation", f"is read with MODE_EVAL only, got MODE_{mode.name}"
            )
        adaptation.check()
        cal.check_supported(self.session_id, self.config, "adaptation")

    def adapt(
        self,
        x: torch.Tensor,
        mode: Mode,
        adaptation: Adaptation,
        statistics_only: bool,
        blocking: bool,
        idempotency_key: str,
        t0: float,
        time_step: int = 0,
    ) -> NormalizeResult:
        """An adapting EVAL batch: normalized with ``(1 - a) * prior + a * batch`` (the prior:
        the adapted statistics, or the running ones without); with ``accumulate``, folded into
        the adapted statistics (once per idempotency key), never into the running ones."""
        self.check_adaptation(mode, adaptation)
        self.check_finite_input(x, "input")
        m = cal.batch_moments(x)
        idem = None
        if adaptation.accumulate:
            idem = self.idempotency(idempotency_key, mode, x, statistics_only, -1, time_step)
        state, mean, var, version, waited, replayed, ticket = self.adapted_statistics(
            m, adaptation, idem, blocking, time_step
        )
        out = None
        if not statistics_only:
            out = ops.normalize(x, mean, var, state.weight, state.bias, self.kind.eps)
        step = Step(out, mean, var)
        batch = adaptation.batch_weight > 0
        return self.result(step, version, batch, waited, t0, replayed, ticket)

    def adapted_statistics(
        self,
        m: ops.Moments,
        adaptation: Adaptation,
        idempotency: Idempotency | None,
        blocking: bool,
        time_step: int = 0,
    ) -> tuple[SessionState, torch.Tensor, torch.Tensor, int, float, bool, Ticket]:
        """An adapting batch's mix (float32 mean and var) of its moments with the prior, the
        batch folded into the adapted statistics first with ``accumulate`` (once per
        idempotency key): (the state the prior was read from, mean, var, version, seconds
        waited, replayed, ticket)."""
        slot = cal.slot_of(self.config, time_step)
        waited, replayed, ticket = 0.0, False, None
        if adaptation.accumulate:

            def compute(s: SessionState) -> SessionState:
                self._check_unfrozen(s, "fold EVAL batches into adapted statistics")
                return s.advanced(adapted=cal.adapt_fold(self.config, s, m, slot))

            state, _, ticket, replayed, version, waited = self._locked_transition(
                compute, idempotency, blocking
            )
        else:
            state = self.state
            version = state.version
        pm, pv = cal.prior(state)
        idx = () if slot is None else (slot,)
        mean, var = cal.mixed(pm[idx], pv[idx], m, adaptation.batch_weight)
        return state, mean.float(), var.float(), version, waited, replayed, ticket

    def reset_adaptation(self) -> tuple[SessionState, Ticket]:
        """Discards the adapted statistics (nothing to discard: no change)."""
        cal.check_supported(self.session_id, self.config, "adaptation")

        def compute(s: SessionState) -> SessionState:
            self._check_unfrozen(s, "reset its adapted statistics")
            if s.adapted is None:
                raise _Same(s)
            return s.advanced(adapted=None)

        return self._change(compute)

    def promote_adaptation(self) -> tuple[SessionState, Ticket]:
        """Replaces the running statistics with the adapted ones, atomically, and discards them."""
        cal.check_supported(self.session_id, self.config, "adaptation")

        def compute(s: SessionState) -> SessionState:
            self._check_unfrozen(s, "promote adapted statistics")
            if s.adapted is None:
                raise FailedPrecondition(
                    f"session {self.session_id!r} has no adapted statistics to promote; send "
                    "MODE_EVAL calls with adaptation.accumulate first"
                )
            a = s.adapted
            return s.advanced(running_mean=a.mean, running_var=a.var, adapted=None)

        return self._change(compute)


class _Same(Exception):
    """A change that would change nothing: ``state`` stays, no version is spent."""

    def __init__(self, state: SessionState) -> None:
        super().__init__()
        self.state = state
