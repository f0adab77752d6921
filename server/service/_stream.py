"""The chunk protocol of NormalizeStream, transport-neutral.

The first chunk of a batch names session and mode, end_of_batch closes it; the answer is the
statistics, then the output chunks, in batch order. A batch that needs its own statistics is
answered after its last chunk; one that does not (EVAL with running statistics) is answered chunk
by chunk as they arrive, so its transfers overlap. A stream that sends nothing for the idle
timeout is ended, its partial batch discarded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from time import perf_counter
from typing import TYPE_CHECKING, TypeAlias, TypeVar

import torch

from normserve.server.service._config import Mode
from normserve.server.service._errors import IdleTimeout, IncompleteStream, InvalidArgument
from normserve.server.service._session import NormalizeResult

if TYPE_CHECKING:
    from normserve.server.service._chunked import ChunkedBatch
    from normserve.server.service._facade import NormalizerService

__all__ = ["Chunk", "StreamEncoder", "serve_stream"]

T = TypeVar("T")


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
    batch: ChunkedBatch | None = None
    header: tuple[str, int, bool] = ("", 0, False)
    index = 0
    decode = encode_s = 0.0
    elements = sent = 0
    compute = service.compute
    while True:
        try:
            req = await _next(chunks, service.stream_idle_timeout, index, batch is not None)
        except StopAsyncIteration:
            break
        t0 = perf_counter()
        if batch is None:
            header = (req.session_id, req.mode, req.statistics_only)
            session = service.sessions.get(req.session_id)
            mode = req.to_mode(req.mode)
            service.stages.label(session.config.kind.value, mode.value)
            batch = session.start_batch(mode, req.statistics_only)
            decode = encode_s = 0.0
            elements = sent = 0
        else:
            _check_header(req, header, index)
        if req.tensor is not None:
            x = req.tensor()
            decode += perf_counter() - t0
            batch.session.check_input(x, "chunk")
            service.check_answer(x, req.statistics_only or batch.statistics_only, "chunk")
            elements += x.numel()
            out = await compute(batch.add, x)
            if out is not None:  # pipelined: answer this chunk now
                t1 = perf_counter()
                msg = encode(index, out, req.end_of_batch, None if sent else batch.header())
                encode_s += perf_counter() - t1
                sent += 1
                yield msg
        if req.end_of_batch:
            result, count = await compute(batch.finish)
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
            index += 1
    if batch is not None:
        raise IncompleteStream(
            "end_of_batch",
            f"the stream ended in the middle of batch {index} (no chunk set end_of_batch); "
            "nothing of that batch was applied",
        )


def _check_header(req: Chunk, header: tuple[str, int, bool], index: int) -> None:
    session_id, mode, stats_only = header
    if req.session_id and req.session_id != session_id:
        raise InvalidArgument(
            "session_id",
            f"a later chunk of batch {index} names session {req.session_id!r}, the first named "
            f"{session_id!r}; nothing of that batch was applied",
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
