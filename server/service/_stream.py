"""The chunk protocol of NormalizeStream, transport-neutral.

The first chunk of a batch names session and mode, end_of_batch closes it; the answer is the
statistics, then the output chunks, in batch order. A batch that needs its own statistics is
answered after its last chunk; one that does not (EVAL with running statistics) is answered chunk
by chunk as they arrive, so its transfers overlap. A stream that sends nothing for the idle
timeout is ended, its partial batch discarded.

Memory: the chunks a batch keeps until its end (those that need the batch's own statistics) are
counted in ``StreamBuffers``, per stream and for all streams together. A chunk that would pass
either bound ends its stream with ResourceExhausted; whatever way a stream ends (refused,
cancelled, idle, failed, finished), its share is given back and its chunks dropped at once.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from time import perf_counter
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import torch

from normserve.server.service._calibration import Adaptation
from normserve.server.service._config import Mode
from normserve.server.service._errors import (
    IdleTimeout,
    IncompleteStream,
    InvalidArgument,
    ResourceExhausted,
)
from normserve.server.service._groups import SyncStep
from normserve.server.service._manager import shown
from normserve.server.service._session import NormalizeResult

if TYPE_CHECKING:
    from normserve.server.service._chunked import ChunkedBatch
    from normserve.server.service._facade import NormalizerService

__all__ = [
    "DEFAULT_MAX_STREAM_BUFFER_BYTES",
    "DEFAULT_MAX_TOTAL_STREAM_BUFFER_BYTES",
    "MIN_CHUNK_BYTES",
    "Chunk",
    "StreamBuffers",
    "StreamEncoder",
    "StreamShare",
    "serve_stream",
]

T = TypeVar("T")

#: The server's defaults (--max-stream-buffer-bytes, --max-total-stream-buffer-bytes).
DEFAULT_MAX_STREAM_BUFFER_BYTES = 256 << 20
DEFAULT_MAX_TOTAL_STREAM_BUFFER_BYTES = 1 << 30
#: The least a kept chunk counts for (its tensor's bookkeeping), so that a batch of many empty
#: chunks is bounded too.
MIN_CHUNK_BYTES = 1024


class StreamBuffers:
    """The bytes streams hold of batches not yet complete, bounded per stream (``per_stream``)
    and for all streams together (``total``); 0 is no bound. Thread-safe. Each stream holds one
    ``StreamShare`` and gives it all back when its batch's answer is sent or the stream ends."""

    def __init__(
        self,
        per_stream: int = DEFAULT_MAX_STREAM_BUFFER_BYTES,
        total: int = DEFAULT_MAX_TOTAL_STREAM_BUFFER_BYTES,
        on_release: Callable[[int], None] | None = None,
    ) -> None:
        self.per_stream = per_stream
        self.total = total
        #: told how many bytes a stream gave back (the server returns large ones to the OS)
        self.on_release = on_release
        self._held = 0
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        """Bytes all streams hold now."""
        return self._held

    def share(self) -> StreamShare:
        return StreamShare(self)

    def _take(self, share: StreamShare, nbytes: int, index: int) -> None:
        with self._lock:
            if self.per_stream and share.held + nbytes > self.per_stream:
                raise ResourceExhausted(
                    f"batch {index} of this stream would hold {share.held + nbytes} bytes before "
                    f"its end, more than the server's --max-stream-buffer-bytes of "
                    f"{self.per_stream}: end batches sooner (end_of_batch), or send smaller ones; "
                    f"nothing of batch {index} was applied"
                )
            if self.total and self._held + nbytes > self.total:
                raise ResourceExhausted(
                    f"the streams on this server hold as much of batches not yet complete as its "
                    f"--max-total-stream-buffer-bytes of {self.total} allows: retry later; "
                    f"nothing of batch {index} was applied"
                )
            self._held += nbytes
            share.held += nbytes

    def _give_back(self, share: StreamShare) -> None:
        with self._lock:
            released, share.held = share.held, 0
            self._held -= released
        if self.on_release is not None and released:
            self.on_release(released)


class StreamShare:
    """What one stream holds of ``StreamBuffers``."""

    __slots__ = ("_buffers", "held")

    def __init__(self, buffers: StreamBuffers) -> None:
        self._buffers = buffers
        self.held = 0

    def take(self, nbytes: int, index: int) -> None:
        """Counts ``nbytes`` more for batch ``index``, or raises ResourceExhausted (nothing taken)."""
        self._buffers._take(self, nbytes, index)

    def release(self) -> None:
        """Gives back all this stream holds (idempotent)."""
        if self.held:
            self._buffers._give_back(self)


@dataclass(frozen=True)
class Chunk:
    """One request of a stream, as the transport read it. ``mode`` is 0 when unset (later chunks
    of a batch may leave it so); ``tensor`` decodes the chunk, None when the request has none."""

    session_id: str
    mode: int
    end_of_batch: bool
    statistics_only: bool
    tensor: Callable[[], torch.Tensor] | None
    to_mode: Callable[[int], Mode]
    idempotency_key: str = ""
    #: recurrent batch norm: the batch's time step (read on its first chunk)
    time_step: int = 0
    #: a synchronized TRAIN batch's rank and step (read on its first chunk; None: not synced)
    sync: SyncStep | None = None
    #: an adapting EVAL batch's adaptation (read on its first chunk; None: not adapting)
    adaptation: Adaptation | None = None


#: Makes one answer message: (batch index, an output chunk or None, whether it ends the batch,
#: the statistics and version on the batch's first answer or None) -> the message.
StreamEncoder: TypeAlias = Callable[[int, torch.Tensor | None, bool, NormalizeResult | None], T]


async def _next(it: AsyncIterator[Chunk], timeout: float, index: int, open_batch: bool) -> Chunk:
    try:
        async with asyncio.timeout(timeout if timeout > 0 else None):
            return await anext(it)
    except TimeoutError:
        lost = (
            f"; batch {index} was not complete and nothing of it was applied" if open_batch else ""
        )
        raise IdleTimeout(
            f"the stream sent nothing for {timeout:g} s (the server's --stream-idle-timeout)" + lost
        ) from None


async def serve_stream(
    service: NormalizerService, chunks: AsyncIterator[Chunk], encode: StreamEncoder[T]
) -> AsyncIterator[T]:
    share = service.stream_buffers.share()
    batch: ChunkedBatch | None = None
    req: Chunk | None = None
    x: torch.Tensor | None = None
    out: torch.Tensor | None = None
    header: tuple[str, int, bool, int] = ("", 0, False, 0)
    sync: SyncStep | None = None  # the open batch's place in a synchronized step
    named: SyncStep | None = None  # the sync its first chunk named
    adapting: Adaptation | None = None  # the adaptation its first chunk named
    index = 0
    decode = encode_s = 0.0
    elements = sent = 0
    compute = service.compute
    try:
        while True:
            try:
                req = await _next(chunks, service.stream_idle_timeout, index, batch is not None)
            except StopAsyncIteration:
                break
            t0 = perf_counter()
            if batch is None:
                header = (req.session_id, req.mode, req.statistics_only, req.time_step)
                session = service.sessions.get(req.session_id)
                mode = req.to_mode(req.mode)
                service.stages.label(session.config.kind.value, mode.value)
                named = req.sync
                adapting = req.adaptation
                sync = _synchronized(session, mode, named)
                if sync is None:
                    batch = session.start_batch(
                        mode, req.statistics_only, req.idempotency_key, req.time_step, adapting
                    )
                else:  # its statistics go through the group's rendezvous, not the session's
                    if adapting is not None:
                        session.check_adaptation(mode, adapting)  # refuses a TRAIN batch
                    from normserve.server.service._chunked import ChunkedBatch

                    batch = ChunkedBatch(session, mode, req.statistics_only, "", req.time_step)
                decode = encode_s = 0.0
                elements = sent = 0
            else:
                _check_header(req, header, index)
                _check_sync(req, named, index)
                _check_adaptation(req, adapting, index)
            if req.tensor is not None:
                x = req.tensor()
                decode += perf_counter() - t0
                batch.session.check_input(x, "chunk")
                service.check_answer(
                    x,
                    req.statistics_only or batch.statistics_only,
                    "chunk",
                    batch.statistics_numel(x.shape),
                )
                if batch.keeps_chunks:
                    share.take(max(x.numel() * x.element_size(), MIN_CHUNK_BYTES), index)
                elements += x.numel()
                out = await compute(batch.add, x)
                x = None
                if out is not None:  # pipelined: answer this chunk now
                    t1 = perf_counter()
                    msg = encode(index, out, req.end_of_batch, None if sent else batch.header())
                    encode_s += perf_counter() - t1
                    sent += 1
                    yield msg
            if req.end_of_batch:
                if batch.statistics_grow:  # others' [C] came with each chunk's check
                    service.check_batch_answer(batch, index)
                if sync is None:
                    result, count = await compute(batch.finish)
                    await service.durable(result.durable)
                else:
                    # waits for the group holding no thread; a stream cancelled meanwhile (its
                    # client went away) aborts the step for all, as a unary participant would
                    moments, values, shape = batch.sync_contribution()
                    t_wait = perf_counter()
                    fwd, replayed = await service.sync_forward(
                        batch.session, moments, values, shape, sync
                    )
                    result, count = batch.finish_synced(fwd, replayed, perf_counter() - t_wait)
                if not sent:
                    if not count:  # statistics only
                        t1 = perf_counter()
                        msg = encode(index, None, True, result)
                        encode_s += perf_counter() - t1
                        yield msg
                    else:
                        outputs = batch.outputs()
                        for i in range(count):
                            out = await compute(next, outputs)
                            t1 = perf_counter()
                            msg = encode(index, out, i == count - 1, result if i == 0 else None)
                            encode_s += perf_counter() - t1
                            yield msg
                    result = replace(result, compute_seconds=batch.compute_seconds)
                service.record(
                    "NormalizeStream", batch.session, batch.mode, result, elements, decode, encode_s
                )
                batch = None
                share.release()
                index += 1
    finally:
        # however the stream ends (refused, cancelled, idle, failed), its memory goes at once:
        # its share is given back, and its chunks are dropped now, not when its frame goes (an
        # exception's traceback may hold the frame a while)
        share.release()
        req = x = out = None
        if batch is not None:
            batch.discard()
    if batch is not None:
        raise IncompleteStream(
            "end_of_batch",
            f"the stream ended in the middle of batch {index} (no chunk set end_of_batch); "
            "nothing of that batch was applied",
        )


def _synchronized(session: Any, mode: Mode, sync: SyncStep | None) -> SyncStep | None:
    """The batch's place in a synchronized step: its sync on a TRAIN batch of a synchronized
    session (an EVAL batch ignores it, as a unary call does); None when it joins no step."""
    if sync is None:
        return None
    if not session.config.sync_participants:
        raise InvalidArgument(
            "sync",
            f"session {session.session_id!r} is not synchronized (its config has no sync "
            "group); send no sync",
        )
    return sync if mode is Mode.TRAIN else None


def _check_header(req: Chunk, header: tuple[str, int, bool, int], index: int) -> None:
    session_id, mode, stats_only, time_step = header
    if req.session_id and req.session_id != session_id:
        raise InvalidArgument(
            "session_id",
            f"a later chunk of batch {index} names session {shown(req.session_id)}, the first "
            f"named {shown(session_id)}; nothing of that batch was applied",
        )
    if req.mode and req.mode != mode:
        raise InvalidArgument(
            "mode", f"a later chunk of batch {index} changes the mode; nothing of it was applied"
        )
    if req.statistics_only and not stats_only:
        raise InvalidArgument(
            "statistics_only",
            f"a later chunk of batch {index} sets statistics_only; set it on the first chunk",
        )
    if req.time_step and req.time_step != time_step:
        raise InvalidArgument(
            "time_step",
            f"a later chunk of batch {index} names time step {req.time_step}, the first named "
            f"{time_step}; nothing of that batch was applied",
        )


def _check_sync(req: Chunk, named: SyncStep | None, index: int) -> None:
    if req.sync is not None and req.sync != named:
        first = "none" if named is None else f"rank {named.rank} and step {named.step}"
        raise InvalidArgument(
            "sync",
            f"a later chunk of batch {index} names rank {req.sync.rank} and step "
            f"{req.sync.step}, the first named {first}; nothing of that batch was applied",
        )


def _check_adaptation(req: Chunk, named: Adaptation | None, index: int) -> None:
    if req.adaptation is not None and req.adaptation != named:
        first = (
            "none"
            if named is None
            else f"batch_weight {named.batch_weight:g} and accumulate {named.accumulate}"
        )
        raise InvalidArgument(
            "adaptation",
            f"a later chunk of batch {index} names batch_weight "
            f"{req.adaptation.batch_weight:g} and accumulate {req.adaptation.accumulate}, the "
            f"first named {first}; nothing of that batch was applied",
        )
