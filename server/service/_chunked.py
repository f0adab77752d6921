"""One batch that arrives in chunks along dim 0 (a stream), folded into its session at the end."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import torch

from normserve.server import ops
from normserve.server.service import _calibration as cal
from normserve.server.service import _device
from normserve.server.service._calibration import Adaptation
from normserve.server.service._config import Mode
from normserve.server.service._errors import InvalidArgument
from normserve.server.service._session import NormalizeResult, Session
from normserve.server.service.kinds import Step
from normserve.server.service.kinds._batch_norm import describe

__all__ = ["ChunkedBatch"]


class ChunkedBatch:
    """Statistics are merged chunk by chunk as they arrive; nothing touches the session until
    ``finish``, so a batch that fails half-way leaves the session exactly as it was. A batch that
    needs no statistics of its own (EVAL with running statistics) is answered chunk by chunk.

    A MODE_CALIBRATE batch and an adapting EVAL batch merge their chunks' exact moments
    (``ops.moments``, Chan's merge) whatever the kind, as their unary calls compute the whole
    batch's; at the end they are folded in once (``Session.fold_calibration``,
    ``Session.adapted_statistics``), then their output chunks are normalized."""

    def __init__(
        self,
        session: Session,
        mode: Mode,
        statistics_only: bool,
        idempotency_key: str = "",
        time_step: int = 0,
        adaptation: Adaptation | None = None,
    ) -> None:
        self.session = session
        #: the kind as this batch's time step sees it (recurrent batch norm: one slot)
        self.kind = session.kind.at(time_step)
        self.time_step = time_step
        self.mode = mode
        self.statistics_only = statistics_only
        self.idempotency_key = idempotency_key
        self._t_compute = 0.0
        # the first chunk's dtype and trailing dims, not the chunk: a batch keeps no chunk it
        # does not count against the stream's buffer bounds
        self._first: tuple[torch.dtype, torch.Size] | None = None
        self._rows = 0
        self._first_bytes = 0
        self._chunks: list[torch.Tensor] = []
        self._partial: Any = None
        self._prepared: Any = None
        self._state = session.state
        self.adaptation = adaptation
        #: a calibration or adapting batch: whole-batch moments, its own path through the session
        self._moments_only = mode is Mode.CALIBRATE or adaptation is not None
        self._batch_stats = self._moments_only or self.kind.uses_batch_statistics(mode)
        #: normalizes an output chunk of a calibration or adapting batch (set by ``finish``)
        self._normalize_out: Callable[[torch.Tensor], torch.Tensor] | None = None
        #: normalized with a synchronized step's global statistics (``finish_synced``)
        self._synced = False

    @property
    def keeps_chunks(self) -> bool:
        """Whether ``add`` keeps each chunk until the batch's end (its output needs the batch's
        own statistics); the stream counts those bytes against its buffer bounds."""
        return self._batch_stats and not self.statistics_only

    @property
    def keeps_statistics(self) -> bool:
        """Whether the batch is normalized with statistics of its own (answered at its end)."""
        return self._batch_stats

    def statistics_numel(self, shape: torch.Size | list[int]) -> int:
        """How many values each of the answer's mean and var has, for an input of ``shape``: a
        calibration or adapting batch's are whole-batch ([C]) whatever the kind."""
        if self._moments_only:
            return self.session.config.num_features
        return self.session.kind.statistics_numel(shape)

    @property
    def statistics_grow(self) -> bool:
        """Whether the answer's statistics may grow with the batch (per-sample or per virtual
        batch), so must be checked against the message limit at the batch's end."""
        return self.keeps_statistics and not self._moments_only

    @property
    def shape(self) -> list[int] | None:
        """The batch's shape so far (None before its first chunk)."""
        return None if self._first is None else [self._rows, *self._first[1]]

    @property
    def first_chunk_bytes(self) -> int:
        """The size of the first chunk, so of the first output chunk an answer carries."""
        return self._first_bytes

    def discard(self) -> None:
        """Drops what the batch holds (the batch is abandoned; the session never saw it)."""
        self._chunks = []
        self._first = None
        self._partial = None
        self._prepared = None

    def add(self, x: torch.Tensor, field: str = "chunk") -> torch.Tensor | None:
        """Validates one chunk against the first and folds its statistics in. A pipelined batch
        returns the chunk's output at once (so it can be sent while later chunks arrive) and keeps
        nothing."""
        t0 = time.perf_counter()
        s = self.session
        s.check_input(x, field)
        first = self._first
        if first is None:
            self._first = (x.dtype, x.shape[1:])
            self._first_bytes = x.numel() * x.element_size()
        else:
            dtype, tail = first
            if x.dtype != dtype:
                raise InvalidArgument(
                    f"{field}.dtype",
                    f"chunks of one batch must share a dtype: expected {str(dtype)[6:]}, "
                    f"got {str(x.dtype)[6:]}",
                )
            if x.shape[1:] != tail:
                raise InvalidArgument(
                    f"{field}.shape",
                    f"chunks of one batch may differ only in dim 0: expected "
                    f"[*, {', '.join(str(d) for d in tail)}], got {describe(x.shape)}",
                )
        if x.device != s.device:
            x = _device.to_device(x, s.device)
        self._rows += x.shape[0]
        out = None
        if self._moments_only:
            s.check_finite_input(x, field)
            if x.numel():
                m = ops.moments(x)
                self._partial = m if self._partial is None else ops.merge_moments(self._partial, m)
            if self.keeps_chunks:
                self._chunks.append(x)
        elif self._batch_stats:
            self._partial = self.kind.chunk_statistics(x, self._partial)
            if self.keeps_chunks:
                self._chunks.append(x)
        else:
            s.check_finite_input(x, field)
            if not self.statistics_only:
                out = _device.to_host(self.kind.normalize_chunk(x, None, self._state))[0]
        self._t_compute += time.perf_counter() - t0
        return out

    def header(self) -> NormalizeResult:
        """The statistics and version a pipelined batch is normalized with (known at its start)."""
        st = self.kind.view(self._state)
        assert st.running_mean is not None and st.running_var is not None
        return NormalizeResult(None, st.running_mean, st.running_var, st.version, False)

    def _idempotency(self, shape: list[int], dtype: torch.dtype) -> Any:
        if not self.idempotency_key:
            return None
        probe = torch.empty([0, *shape[1:]], dtype=dtype)
        return self.session.idempotency(
            self.idempotency_key, self.mode, probe, self.statistics_only, shape[0], self.time_step
        )

    def finish(self) -> tuple[NormalizeResult, int]:
        """Applies the batch (TRAIN); returns the result and how many output chunks ``outputs()``
        will give (one per input chunk). Raises InvalidArgument (nothing applied) if the batch is
        empty or unusable."""
        first = self._first
        if first is None:
            raise InvalidArgument("chunk", "the batch ended without any chunk; nothing was applied")
        t0 = time.perf_counter()
        s, kind, mode = self.session, self.kind, self.mode
        shape = [self._rows, *first[1]]
        empty = self._partial is None  # no values at all: an empty batch, as torch allows
        if self._moments_only:
            result = self._finish_moments(first[0], shape, t0)
        elif not self._batch_stats:
            st = self.kind.view(self._state)
            assert st.running_mean is not None and st.running_var is not None
            result = NormalizeResult(None, st.running_mean, st.running_var, st.version, False)
            s.touch()
        elif kind.updates_running(mode):
            prepared: list[Any] = []

            def compute(state: Any, n: int) -> Any:
                step, prep = kind.finish(self._partial, shape, state, mode, n)
                prepared.append(prep)
                return step

            idem = self._idempotency(shape, first[0])
            step, version, waited, ticket, replayed = s.update(
                compute, "chunk", empty, idempotency=idem
            )
            self._prepared = prepared[-1]
            result = s.result(step, version, True, waited, t0, replayed, ticket)
        else:
            step, self._prepared = kind.finish(
                self._partial, shape, self._state, mode, self._state.num_batches_tracked
            )
            s.check_step(step, "chunk", empty)
            result = s.result(step, self._state.version, True, 0.0, t0)
        self._t_compute += result.compute_seconds
        n = len(self._chunks) if self.keeps_chunks else 0
        return replace(result, compute_seconds=self._t_compute), n

    def _finish_moments(self, dtype: torch.dtype, shape: list[int], t0: float) -> NormalizeResult:
        """A calibration batch folded into the accumulator, or an adapting batch's mix (folded
        into the adapted statistics with accumulate), as the unary call of the whole batch."""
        s, m = self.session, self._partial
        cal.check_count(0 if m is None else m.count, shape, "chunk")
        assert m is not None
        eps = s.kind.eps
        a = self.adaptation
        if a is None:
            idem = self._idempotency(shape, dtype)
            new, version, waited, replayed, ticket = s.fold_calibration(
                m, shape[0], idem, True, self.time_step
            )
            w, b, shift = new.weight, new.bias, ops.batch_shift(m)
            self._normalize_out = lambda x: ops.normalize_batch(x, m, w, b, eps, shift)
            step, batch = Step(None, m.mean, m.var), True
        else:
            idem = self._idempotency(shape, dtype) if a.accumulate else None
            state, mean, var, version, waited, replayed, ticket = s.adapted_statistics(
                m, a, idem, True, self.time_step
            )
            w, b = state.weight, state.bias
            self._normalize_out = lambda x: ops.normalize(x, mean, var, w, b, eps)
            step, batch = Step(None, mean, var), a.batch_weight > 0
        return s.result(step, version, batch, waited, t0, replayed, ticket)

    def sync_contribution(self) -> tuple[Any, int, list[int]]:
        """A synchronized TRAIN batch's share of its step: its statistics merged over its chunks,
        its values per channel and its shape, as a unary participant's would be. Raises
        InvalidArgument (nothing joined) if the batch is empty."""
        first = self._first
        if first is None:
            raise InvalidArgument("chunk", "the batch ended without any chunk; nothing was applied")
        shape = [self._rows, *first[1]]
        return self._partial, math.prod(shape) // shape[1], shape

    def finish_synced(self, fwd: Any, replayed: bool, waited: float) -> tuple[NormalizeResult, int]:
        """Takes the step's global statistics (``fwd``, the facade's synchronized forward): the
        output chunks will be normalized with them. Returns the result, and how many output
        chunks ``outputs()`` will give, as ``finish`` does."""
        self._synced = True
        self._prepared, self._state = fwd.prepared, fwd.state
        step = fwd.step.value
        self.session.touch()
        result = NormalizeResult(
            None,
            step.mean.float(),
            step.var.float(),
            fwd.version,
            True,
            waited,
            self._t_compute,
            replayed,
        )
        return result, len(self._chunks) if self.keeps_chunks else 0

    def outputs(self) -> Iterator[torch.Tensor]:
        """The output chunks, computed one at a time as they are taken, so the first can be on
        its way while the next is computed; each input chunk is released once normalized."""
        if not self._batch_stats or self.statistics_only:
            return
        st = self._state
        kind = self.kind
        chunks, self._chunks = self._chunks, []
        for i in range(len(chunks)):
            t0 = time.perf_counter()
            x, chunks[i] = chunks[i], None  # type: ignore[call-overload]
            if self._normalize_out is not None:
                out = self._normalize_out(x)
            elif self._synced and (self._prepared is None or x.numel() == 0):
                out = torch.empty_like(x)  # as a unary participant's empty batch
            else:
                out = kind.normalize_chunk(x, self._prepared, st)
            host = _device.to_host(out)[0]  # pinned, waiting for this stream only (CUDA)
            self._t_compute += time.perf_counter() - t0
            assert host is not None
            yield host

    @property
    def compute_seconds(self) -> float:
        """Compute time of the batch so far (chunk statistics, finish, outputs taken)."""
        return self._t_compute
