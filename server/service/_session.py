"""A session: one remote normalization layer, its running statistics, and how calls touch them.

Concurrency model: the state is an immutable snapshot replaced under a per-session lock, so updates
are serialized and each is applied exactly once. A unary TRAIN call runs its one fused kernel
(output, statistics and running update) under the lock: the update must follow the state it was
computed from, and one kernel is cheaper than computing outside and folding in afterwards. A
chunked TRAIN batch merges its statistics without the lock and holds it only to fold them in. EVAL
calls read the current snapshot without locking, so they never wait for each other.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from normserve.server import ops
from normserve.server.service._config import Mode, SessionConfig
from normserve.server.service._errors import InvalidArgument

__all__ = ["ChunkedBatch", "NormalizeResult", "Session", "SessionState"]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class SessionState:
    """Everything a call may change, as one immutable value."""

    version: int
    num_batches_tracked: int
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    update_time: float


@dataclass(frozen=True)
class NormalizeResult:
    """What one normalization returns; the stage times feed the server's metrics."""

    output: torch.Tensor | None
    mean: torch.Tensor
    var: torch.Tensor
    version: int
    batch_statistics: bool
    wait_seconds: float = 0.0
    compute_seconds: float = 0.0


def _total(t: torch.Tensor) -> float:
    """Sum of a small tensor as a float (numpy's sum when on the CPU: a fraction of torch's cost)."""
    return float(t.numpy().sum() if t.device.type == "cpu" else t.sum())


def _describe(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


class Session:
    """A batch-norm session. Thread-safe; see the module docstring for the locking model."""

    def __init__(
        self,
        session_id: str,
        config: SessionConfig,
        device: torch.device,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        self.session_id = session_id
        self.config = config
        self.device = device
        self.create_time = time.time()
        self._lock = threading.Lock()
        if config.affine:
            w0, b0 = weight, bias
            weight = self._filled(1.0) if w0 is None else self._param(w0, "config.initial_weight")
            bias = self._filled(0.0) if b0 is None else self._param(b0, "config.initial_bias")
        elif weight is not None or bias is not None:
            raise InvalidArgument("config.initial_weight", "needs affine=true")
        track = config.track_running_stats
        self._state = SessionState(
            version=1,
            num_batches_tracked=0,
            running_mean=self._filled(0.0) if track else None,
            running_var=self._filled(1.0) if track else None,
            weight=weight,
            bias=bias,
            update_time=self.create_time,
        )

    # ---- reading

    @property
    def state(self) -> SessionState:
        """The current snapshot (one atomic attribute read; never mutated in place)."""
        return self._state

    def _filled(self, value: float) -> torch.Tensor:
        return torch.full(
            (self.config.num_features,), value, dtype=torch.float32, device=self.device
        )

    # ---- validation shared by unary and chunked calls

    def _param(self, t: torch.Tensor, field: str, *, nonnegative: bool = False) -> torch.Tensor:
        c = self.config.num_features
        if t.dtype not in FLOAT_DTYPES:
            raise InvalidArgument(field, f"expected a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != (c,):
            raise InvalidArgument(field, f"expected shape [{c}], got {_describe(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise InvalidArgument(field, "contains NaN or Inf")
        if nonnegative and bool((t < 0).any()):
            raise InvalidArgument(field, "variances must be >= 0")
        return t.to(device=self.device, dtype=torch.float32)

    def check_input(self, x: torch.Tensor, field: str = "input") -> None:
        """Rank, channel count and dtype; raises InvalidArgument naming ``field``."""
        if x.dtype not in FLOAT_DTYPES:
            raise InvalidArgument(
                f"{field}.dtype",
                f"expected float32, float16, bfloat16 or float64, got {str(x.dtype)[6:]}",
            )
        if not 2 <= x.dim() <= 5:
            raise InvalidArgument(
                f"{field}.shape",
                f"expected rank 2 to 5 ([N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]), "
                f"got rank {x.dim()} {_describe(x.shape)}",
            )
        c = self.config.num_features
        if x.shape[1] != c:
            raise InvalidArgument(
                f"{field}.shape[1]", f"expected {c} channels (num_features), got {x.shape[1]}"
            )

    def _check_finite_input(self, x: torch.Tensor, field: str) -> None:
        if self.config.allow_non_finite:
            return
        # One fast reduction; the elementwise scan runs only if the sum is not finite.
        total = float(x.sum(dtype=torch.float64 if x.dtype == torch.float64 else torch.float32))
        if not math.isfinite(total) and not bool(torch.isfinite(x).all()):
            raise InvalidArgument(field, "contains NaN or Inf; nothing was applied")

    def _check_count(self, count: int, field: str, shape: Sequence[int]) -> None:
        if count <= 1:
            raise InvalidArgument(
                f"{field}.shape",
                "batch statistics need more than 1 value per channel, "
                f"got input size {_describe(shape)}",
            )

    def _check_stats(self, var: torch.Tensor, field: str) -> None:
        # NaN/Inf anywhere in the input make every statistic of its channel non-finite, the
        # variance included (inf - inf); so can values too large to square. One reduction.
        if not self.config.allow_non_finite and not math.isfinite(_total(var)):
            raise InvalidArgument(
                field,
                "contains NaN or Inf (or values too large for float32 statistics); "
                "nothing was applied",
            )

    def uses_batch_statistics(self, mode: Mode) -> bool:
        return mode is Mode.TRAIN or not self.config.track_running_stats

    # ---- the state transition

    def _apply(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> tuple[int, float]:
        """Folds one batch's statistics into the running ones; returns (version, seconds waited).
        The lock covers only this: a few [C]-sized kernels."""
        t0 = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - t0
            s = self._state
            assert s.running_mean is not None and s.running_var is not None
            n = s.num_batches_tracked + 1
            factor = ops.ema_factor(self.config.momentum, n)
            running_mean, running_var = ops.update_running(
                s.running_mean, s.running_var, mean, var, count, factor
            )
            self._commit(s, n, running_mean, running_var)
            return s.version + 1, waited

    def _train(
        self, x: torch.Tensor, field: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float]:
        """One TRAIN batch with running statistics, fused: output, statistics and running update
        in one kernel, under the session's lock (which orders the updates; TRAIN calls to one
        session are serialized anyway). Returns (output, mean, var, version, seconds waited)."""
        t0 = time.perf_counter()
        with self._lock:
            waited = time.perf_counter() - t0
            s = self._state
            assert s.running_mean is not None and s.running_var is not None
            n = s.num_batches_tracked + 1
            factor = ops.ema_factor(self.config.momentum, n)
            out, mean, var, new = ops.batch_norm_train(
                x, s.weight, s.bias, self.config.eps, (s.running_mean, s.running_var), factor
            )
            self._check_stats(var, field)  # before the commit: a bad batch changes nothing
            assert new is not None
            self._commit(s, n, *new)
            return out, mean, var, s.version + 1, waited

    def _commit(
        self, s: SessionState, n: int, running_mean: torch.Tensor, running_var: torch.Tensor
    ) -> None:
        self._state = SessionState(
            s.version + 1, n, running_mean, running_var, s.weight, s.bias, time.time()
        )

    def _result(
        self,
        output: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        version: int,
        batch_statistics: bool,
        waited: float,
        t_start: float,
    ) -> NormalizeResult:
        if self.device.type == "cuda":
            # Kernels are asynchronous: wait so compute time is the kernels' time, not the launch's.
            torch.cuda.synchronize(self.device)
        if mean.dtype != torch.float32:
            mean, var = mean.float(), var.float()
        compute = time.perf_counter() - t_start - waited
        return NormalizeResult(output, mean, var, version, batch_statistics, waited, compute)

    # ---- calls

    def normalize(
        self, x: torch.Tensor, mode: Mode, statistics_only: bool = False
    ) -> NormalizeResult:
        """Normalizes one batch; in TRAIN mode (with running statistics) folds it in first."""
        t0 = time.perf_counter()
        self.check_input(x)
        if x.device != self.device:
            x = x.to(self.device)
        state = self._state
        cfg = self.config
        output = None
        if mode is Mode.EVAL and cfg.track_running_stats:
            self._check_finite_input(x, "input")
            mean, var = state.running_mean, state.running_var
            assert mean is not None and var is not None
            if not statistics_only:
                output = ops.normalize(x, mean, var, state.weight, state.bias, cfg.eps)
            return self._result(output, mean, var, state.version, False, 0.0, t0)
        count = x.numel() // x.shape[1]
        self._check_count(count, "input", x.shape)
        version, waited = state.version, 0.0
        if statistics_only:
            m = ops.moments(x)
            mean, var = m.mean, m.var
            self._check_stats(var, "input")
            if mode is Mode.TRAIN and cfg.track_running_stats:
                version, waited = self._apply(mean, var, count)
        elif mode is Mode.TRAIN and cfg.track_running_stats:
            output, mean, var, version, waited = self._train(x, "input")
        else:
            output, mean, var, _ = ops.batch_norm_train(x, state.weight, state.bias, cfg.eps)
            self._check_stats(var, "input")
        return self._result(output, mean, var, version, True, waited, t0)

    def start_batch(self, mode: Mode, statistics_only: bool = False) -> ChunkedBatch:
        """Begins a batch that arrives in chunks along dim 0 (see ChunkedBatch)."""
        return ChunkedBatch(self, mode, statistics_only)

    def reset(self) -> SessionState:
        """Running statistics back to mean 0, var 1, 0 batches (weight and bias stay)."""
        with self._lock:
            s = self._state
            if s.running_mean is None:
                return s  # nothing tracked, nothing to change
            self._state = replace(
                s,
                version=s.version + 1,
                num_batches_tracked=0,
                running_mean=self._filled(0.0),
                running_var=self._filled(1.0),
                update_time=time.time(),
            )
            return self._state

    def state_keys(self) -> list[str]:
        """torch's state_dict keys for this config, in torch's order."""
        keys = []
        if self.config.affine:
            keys += ["weight", "bias"]
        if self.config.track_running_stats:
            keys += ["running_mean", "running_var", "num_batches_tracked"]
        return keys

    def export_state(self) -> tuple[OrderedDict[str, torch.Tensor], int]:
        """A torch-compatible state_dict (CPU tensors) and the version it was read at."""
        s = self._state
        values: dict[str, torch.Tensor | None] = {
            "weight": s.weight,
            "bias": s.bias,
            "running_mean": s.running_mean,
            "running_var": s.running_var,
            "num_batches_tracked": torch.tensor(s.num_batches_tracked, dtype=torch.int64),
        }
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for key in self.state_keys():
            value = values[key]
            assert value is not None
            out[key] = value.detach().cpu()
        return out, s.version

    def import_state(self, entries: dict[str, torch.Tensor], strict: bool) -> SessionState:
        """Replaces the state from state_dict entries, all or nothing."""
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
                if value.dtype != torch.int64 or value.dim() != 0 or int(value) < 0:
                    raise InvalidArgument(field, "expected a non-negative int64 scalar")
                new[key] = int(value)
            else:
                new[key] = self._param(value, field, nonnegative=key == "running_var")
        with self._lock:
            s = self._state
            self._state = replace(
                s,
                version=s.version + 1,
                update_time=time.time(),
                **new,  # type: ignore[arg-type]
            )
            return self._state


class ChunkedBatch:
    """One batch arriving in chunks along dim 0 (a stream). Statistics are merged chunk by chunk
    with Chan's algorithm as they arrive; nothing touches the session until ``finish``, so a batch
    that fails half-way leaves the session exactly as it was."""

    def __init__(self, session: Session, mode: Mode, statistics_only: bool) -> None:
        self.session = session
        self.mode = mode
        self.statistics_only = statistics_only
        self._t_compute = 0.0
        self._first: torch.Tensor | None = None
        self._rows = 0
        self._chunks: list[torch.Tensor] = []
        self._moments: ops.Moments | None = None
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state = session.state
        self._batch_stats = session.uses_batch_statistics(mode)

    def add(self, x: torch.Tensor, field: str = "chunk") -> torch.Tensor | None:
        """Validates one chunk against the first and folds its statistics in. When the batch needs
        no statistics of its own (EVAL with running statistics), returns the chunk's output at
        once, so it can be sent while later chunks arrive, and keeps nothing."""
        t0 = time.perf_counter()
        s = self.session
        s.check_input(x, field)
        first = self._first
        if first is None:
            self._first = x
        else:
            if x.dtype != first.dtype:
                raise InvalidArgument(
                    f"{field}.dtype",
                    f"chunks of one batch must share a dtype: expected {str(first.dtype)[6:]}, "
                    f"got {str(x.dtype)[6:]}",
                )
            if x.shape[1:] != first.shape[1:]:
                raise InvalidArgument(
                    f"{field}.shape",
                    f"chunks of one batch may differ only in dim 0: expected "
                    f"[*, {', '.join(str(d) for d in first.shape[1:])}], got {_describe(x.shape)}",
                )
        if x.device != s.device:
            x = x.to(s.device)
        self._rows += x.shape[0]
        out = None
        if self._batch_stats:
            m = ops.moments(x) if x.shape[0] else None
            if m is not None:
                self._moments = m if self._moments is None else ops.merge_moments(self._moments, m)
            if not self.statistics_only:
                self._chunks.append(x)
        else:
            s._check_finite_input(x, field)
            if not self.statistics_only:
                st = self._state
                assert st.running_mean is not None and st.running_var is not None
                out = ops.normalize(
                    x, st.running_mean, st.running_var, st.weight, st.bias, s.config.eps
                )
        self._t_compute += time.perf_counter() - t0
        return out

    def header(self) -> NormalizeResult:
        """The statistics and version a pipelined batch is normalized with (known at its start)."""
        st = self._state
        assert st.running_mean is not None and st.running_var is not None
        return NormalizeResult(None, st.running_mean, st.running_var, st.version, False)

    def finish(self) -> tuple[NormalizeResult, int]:
        """Applies the batch (TRAIN); returns the result and how many output chunks ``outputs()``
        will give (one per input chunk). Raises InvalidArgument (nothing applied) if the batch is
        empty or unusable."""
        first = self._first
        if first is None:
            raise InvalidArgument("chunk", "the batch ended without any chunk; nothing was applied")
        t0 = time.perf_counter()
        s = self.session
        state = self._state
        cfg = s.config
        if self._batch_stats:
            m = self._moments
            s._check_count(m.count if m else 0, "chunk", [self._rows, *first.shape[1:]])
            assert m is not None
            mean, var = m.mean.float(), m.var.float()
            s._check_stats(var, "chunk")
            version, waited = state.version, 0.0
            if self.mode is Mode.TRAIN and cfg.track_running_stats:
                version, waited = s._apply(mean, var, m.count)
        else:
            assert state.running_mean is not None and state.running_var is not None
            mean, var, version, waited = state.running_mean, state.running_var, state.version, 0.0
        self._stats = (mean, var)
        result = s._result(None, mean, var, version, self._batch_stats, waited, t0)
        self._t_compute += result.compute_seconds
        n = len(self._chunks) if self._batch_stats and not self.statistics_only else 0
        return replace(result, compute_seconds=self._t_compute), n

    def outputs(self) -> Iterator[torch.Tensor]:
        """The output chunks, computed one at a time as they are taken, so the first can be on
        its way while the next is computed; each input chunk is released once normalized."""
        if not self._batch_stats or self.statistics_only:
            return
        assert self._stats is not None, "finish() first"
        mean, var = self._stats
        st = self._state
        chunks, self._chunks = self._chunks, []
        for i in range(len(chunks)):
            t0 = time.perf_counter()
            x, chunks[i] = chunks[i], None  # type: ignore[call-overload]
            out = ops.normalize(x, mean, var, st.weight, st.bias, self.session.config.eps)
            self._t_compute += time.perf_counter() - t0
            yield out

    @property
    def compute_seconds(self) -> float:
        """Compute time of the batch so far (chunk statistics, finish, outputs taken)."""
        return self._t_compute
