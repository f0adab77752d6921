"""The service facade: every operation a transport offers, as one call each.

A transport converts its message, makes one call here, converts back. What is not the transport's
lives here, so a second transport gets it for free: lookups, the answer-size check (nothing is
applied that cannot be answered), where compute runs, stage timing, and the chunk protocol of
streams (``_stream``).

Concurrency: the facade is asyncio. Tensor work runs on a bounded thread pool (``workers``), so a
call waiting for the network (an idle stream, a client sending slowly) holds no thread; small
calls that change nothing run on the event loop itself, where a thread hop would cost more than
the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol, TypeVar

import torch

from normserve.server.service._config import ANSWER_OVERHEAD_BYTES, Mode, SessionConfig
from normserve.server.service._errors import ResourceExhausted
from normserve.server.service._manager import SessionManager
from normserve.server.service._session import Busy, NormalizeResult, Session
from normserve.server.service._state import SessionState
from normserve.server.service._stream import Chunk, StreamEncoder, serve_stream

__all__ = [
    "Chunk",
    "NormalizeCall",
    "NormalizerService",
    "StageObserver",
    "StreamEncoder",
]

T = TypeVar("T")

#: Calls whose input is at most this many bytes and that change nothing run on the event loop.
INLINE_BYTES = 64 * 1024


class StageObserver(Protocol):
    """Where the facade reports what only it knows (implemented by the transport's metrics)."""

    def label(self, kind: str, mode: str) -> None:
        """The kind and mode of the call running in this context."""

    def batch(
        self,
        method: str,
        kind: str,
        mode: str,
        stages: tuple[float, float, float, float],
        elements: int,
        trained: bool,
    ) -> None:
        """One batch done: (decode, wait, compute, encode) seconds and its element count."""


class _NoStages:
    def label(self, kind: str, mode: str) -> None:
        pass

    def batch(self, *args: Any) -> None:
        pass


@dataclass(frozen=True)
class NormalizeCall:
    """One unary normalization; ``tensor`` decodes the input (timed as the decode stage)."""

    session_id: str
    mode: Callable[[], Mode]
    tensor: Callable[[], torch.Tensor]
    statistics_only: bool = False


class NormalizerService:
    """Sessions and normalization behind one asyncio facade; see the module docstring."""

    def __init__(
        self,
        sessions: SessionManager,
        *,
        workers: int = 16,
        max_answer_bytes: int = 16 * 1024 * 1024,
        stream_idle_timeout: float = 60.0,
        stages: StageObserver | None = None,
    ) -> None:
        self.sessions = sessions
        self.max_answer_bytes = max_answer_bytes
        self.stream_idle_timeout = stream_idle_timeout
        self.stages: StageObserver = stages or _NoStages()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="compute")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn`` on the compute pool (with this context, so logs keep the request id)."""
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(ctx.run, fn, *args))

    # ---- sessions: small, in-memory, answered on the loop

    def create_session(
        self,
        config: SessionConfig,
        session_id: str = "",
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> Session:
        return self.sessions.create(config, session_id, weight, bias)

    def get_session(self, session_id: str) -> Session:
        return self.sessions.get(session_id)

    def list_sessions(self, page_size: int, page_token: str) -> tuple[list[Session], str]:
        return self.sessions.list(page_size, page_token)

    def delete_session(self, session_id: str) -> None:
        self.sessions.delete(session_id)

    def reset_session(self, session_id: str) -> tuple[Session, SessionState]:
        s = self.sessions.get(session_id)
        return s, s.reset()

    def export_state(self, session_id: str) -> tuple[OrderedDict[str, torch.Tensor], int]:
        return self.sessions.get(session_id).export_state()

    def import_state(
        self, session_id: str, entries: dict[str, torch.Tensor], strict: bool
    ) -> tuple[Session, SessionState]:
        s = self.sessions.get(session_id)
        return s, s.import_state(entries, strict)

    # ---- normalization

    def check_answer(self, x: torch.Tensor, statistics_only: bool, what: str = "call") -> None:
        """Refuses, before anything is applied, a call whose answer could not be sent."""
        out = 0 if statistics_only else x.numel() * x.element_size()
        size = out + 8 * x.shape[1] + ANSWER_OVERHEAD_BYTES
        if size > self.max_answer_bytes:
            shape = ", ".join(str(d) for d in x.shape)
            raise ResourceExhausted(
                f"the answer to this {what} (output [{shape}] {str(x.dtype)[6:]}, {out} bytes) "
                f"would exceed the server's message limit of {self.max_answer_bytes} bytes; "
                "send the batch through NormalizeStream in smaller chunks; nothing was applied"
            )

    async def normalize(self, call: NormalizeCall, encode: Callable[[NormalizeResult], T]) -> T:
        """One batch: look up, decode, check, compute (inline or on the pool), encode."""
        t0 = perf_counter()
        session = self.sessions.get(call.session_id)
        mode = call.mode()
        self.stages.label(session.config.kind.value, mode.value)
        x = call.tensor()
        t1 = perf_counter()
        session.check_input(x)
        self.check_answer(x, call.statistics_only)
        result = None
        if x.numel() * x.element_size() <= INLINE_BYTES:
            # a thread hop costs more than this work; never wait for a lock on the loop, though
            with contextlib.suppress(Busy):
                result = session.normalize(x, mode, call.statistics_only, blocking=False)
        if result is None:
            result = await self.compute(session.normalize, x, mode, call.statistics_only)
        t2 = perf_counter()
        answer = encode(result)
        self.record("Normalize", session, mode, result, x.numel(), t1 - t0, perf_counter() - t2)
        return answer

    def record(
        self,
        method: str,
        session: Session,
        mode: Mode,
        result: NormalizeResult,
        elements: int,
        decode: float,
        encode: float,
    ) -> None:
        stages = (decode, result.wait_seconds, result.compute_seconds, encode)
        trained = session.kind.updates_running(mode)
        self.stages.batch(method, session.config.kind.value, mode.value, stages, elements, trained)

    def stream(self, chunks: AsyncIterator[Chunk], encoder: StreamEncoder[T]) -> AsyncIterator[T]:
        """Many batches on one stream, chunked along dim 0; see ``_stream.serve_stream``."""
        return serve_stream(self, chunks, encoder)
