"""The service facade: every operation a transport offers, as one call each.

A transport converts its message, makes one call here, converts back. What is not the transport's
lives here, so a second transport gets it for free: lookups, the answer-size check (nothing is
applied that cannot be answered), where compute runs, stage timing, the chunk protocol of
streams (``_stream``), and tenants: ``for_tenant(name)`` is the facade as that tenant sees it
(its own sessions, its quotas of open streams and in-flight bytes); the facade constructed is the
default tenant's.

Concurrency: the facade is asyncio. Tensor work runs on a bounded thread pool (``workers``), so a
call waiting for the network (an idle stream, a client sending slowly) holds no thread; small
calls run on the event loop itself, where a thread hop would cost more than the work, unless the
store does I/O (a shared store: every state read and commit is a round trip), which runs on the
pool.

Durability: a change is answered only once its store's ticket completes (the strict local
store's group commit); the wait holds no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import functools
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from normserve.server import ops
from normserve.server.service import _device
from normserve.server.service._calibration import Adaptation
from normserve.server.service._config import ANSWER_OVERHEAD_BYTES, Mode, SessionConfig
from normserve.server.service._errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from normserve.server.service._groups import Groups, SyncStep, reduce_sums
from normserve.server.service._manager import SessionManager
from normserve.server.service._quotas import TenantQuotas
from normserve.server.service._session import Busy, NormalizeResult, Session
from normserve.server.service._state import SessionState
from normserve.server.service._stream import Chunk, StreamBuffers, StreamEncoder, serve_stream
from normserve.server.service.stores import Ticket
from normserve.server.service.stores._base import Idempotency

if TYPE_CHECKING:
    from normserve.server.service._chunked import ChunkedBatch

__all__ = [
    "Chunk",
    "NormalizeCall",
    "NormalizerService",
    "SessionView",
    "StageObserver",
    "StreamEncoder",
    "SyncReduced",
    "SyncStep",
]

T = TypeVar("T")

#: Calls whose input is at most this many bytes and that change nothing run on the event loop.
INLINE_BYTES = 64 * 1024
#: Tenant views kept (tenants come from the server's token table: a handful).
MAX_VIEWS = 4096


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
class SessionView:
    """A session as an answer shows it: its state read at one moment, and when it expires."""

    session: Session
    state: SessionState
    expire_time: float | None


@dataclass(frozen=True)
class NormalizeCall:
    """One unary normalization; ``tensor`` decodes the input (timed as the decode stage).
    ``nbytes``, the request's size, counts against the tenant's in-flight bytes until the answer
    is encoded."""

    session_id: str
    mode: Callable[[], Mode]
    tensor: Callable[[], torch.Tensor]
    statistics_only: bool = False
    nbytes: int = 0
    idempotency_key: str = ""
    #: a participant's place in a synchronized TRAIN step (None: not synchronized)
    sync: SyncStep | None = None
    #: recurrent batch norm: the batch's time step (0 for the other kinds)
    time_step: int = 0
    #: an EVAL call's adaptation (None: plain EVAL)
    adaptation: Adaptation | None = None


@dataclass(frozen=True)
class SyncReduced:
    """A synchronized step's backward sums over the group."""

    sum_dy: torch.Tensor
    sum_dy_xhat: torch.Tensor
    count: int
    replayed: bool


@dataclass(frozen=True)
class _SyncForward:
    """What a synchronized step's combine leaves every participant: the global statistics, what
    normalizing with them needs, and the version after the step's update."""

    step: Any
    prepared: Any
    state: SessionState
    version: int


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
        stream_buffers: StreamBuffers | None = None,
    ) -> None:
        self.sessions = sessions
        self.max_answer_bytes = max_answer_bytes
        self.stream_idle_timeout = stream_idle_timeout
        self.stream_buffers = stream_buffers or StreamBuffers()
        self.stages: StageObserver = stages or _NoStages()
        # each worker queues CUDA kernels on a stream of its own: calls overlap on the device,
        # and a call waits for its own work only (_device)
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="compute", initializer=_device.own_streams
        )
        self._views: dict[str, NormalizerService] = {}
        #: rendezvous of synchronized sessions (shared by every tenant's view): in this process,
        #: or through the store where it is shared across processes (Redis)
        rendezvous = getattr(sessions.store, "rendezvous", None)
        self.groups: Any = rendezvous() if rendezvous is not None else Groups()
        #: the store is in this process (memory, local files): its reads and commits may run on
        #: the event loop
        self.local_store = not sessions.store.shared

    @property
    def tenant(self) -> str:
        return self.sessions.tenant

    @property
    def quotas(self) -> TenantQuotas:
        return self.sessions.quotas

    def for_tenant(self, tenant: str) -> NormalizerService:
        """This facade as ``tenant`` sees it: its sessions and quotas, the same compute pool."""
        if tenant == self.tenant:
            return self
        view = self._views.get(tenant)
        if view is None:
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            view = copy.copy(self)
            view.sessions = self.sessions.for_tenant(tenant)
            self._views[tenant] = view
        return view

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        closing = getattr(self.groups, "close", None)
        if closing is not None:
            closing()

    async def compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs ``fn`` on the compute pool (with this context, so logs keep the request id)."""
        ctx = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(ctx.run, fn, *args))

    # ---- sessions: small; on the loop unless the store does I/O

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """A session operation: on the loop with a store in this process, on the pool with a
        store that does I/O."""
        if self.local_store:
            return fn(*args)
        return await self.compute(fn, *args)

    @staticmethod
    async def durable(ticket: Ticket) -> None:
        """Waits (holding no thread) until a change is as durable as its store makes it."""
        if ticket is not None:
            await asyncio.wrap_future(ticket)

    @staticmethod
    def _view(session: Session, state: SessionState | None = None) -> SessionView:
        if state is None:
            state = session.read_state(touch=False)
        return SessionView(session, state, session.expire_time())

    async def create_session(
        self,
        config: SessionConfig,
        session_id: str = "",
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> SessionView:
        if (
            config.sync_participants
            and not self.local_store
            and not getattr(self.groups, "shared", False)
        ):
            raise FailedPrecondition(
                "config.sync: a synchronized session's participants must all reach one server "
                "process, and this server's store is shared across processes (replicas); "
                "create it on a server with a store of its own"
            )

        def create() -> SessionView:
            s = self.sessions.create(config, session_id, weight, bias)
            return self._view(s)

        view = await self._run(create)
        await self.durable(view.session.created)
        return view

    async def get_session(self, session_id: str) -> SessionView:
        return await self._run(lambda: self._view(self.sessions.get(session_id)))

    async def list_sessions(self, page_size: int, page_token: str) -> tuple[list[SessionView], str]:
        def page() -> tuple[list[SessionView], str]:
            sessions, token = self.sessions.list(page_size, page_token)
            views = []
            for s in sessions:
                with contextlib.suppress(NotFound):  # deleted meanwhile: not listed
                    views.append(self._view(s))
            return views, token

        return await self._run(page)

    async def delete_session(self, session_id: str) -> None:
        await self.durable(await self._run(self.sessions.delete, session_id))

    async def reset_session(self, session_id: str) -> SessionView:
        def reset() -> tuple[SessionView, Ticket]:
            s = self.sessions.get(session_id)
            state, ticket = s.reset()
            return self._view(s, state), ticket

        view, ticket = await self._run(reset)
        await self.durable(ticket)
        return view

    async def export_state(self, session_id: str) -> tuple[OrderedDict[str, torch.Tensor], int]:
        return await self._run(lambda: self.sessions.get(session_id).export_state())

    async def import_state(
        self, session_id: str, entries: dict[str, torch.Tensor], strict: bool
    ) -> SessionView:
        def load() -> tuple[SessionView, Ticket]:
            s = self.sessions.get(session_id)
            state, ticket = s.import_state(entries, strict)
            return self._view(s, state), ticket

        view, ticket = await self._run(load)
        await self.durable(ticket)
        return view

    # ---- freezing, recalibration, adaptation: each a change of state answered with the session

    async def change_session(self, session_id: str, change: str) -> SessionView:
        """One of the Session's state changes without arguments, by name: ``set_frozen`` as
        "freeze"/"unfreeze", or start_calibration, commit_calibration, abort_calibration,
        reset_adaptation, promote_adaptation."""

        def run() -> tuple[SessionView, Ticket]:
            s = self.sessions.get(session_id)
            if change in ("freeze", "unfreeze"):
                state, ticket = s.set_frozen(change == "freeze")
            else:
                assert change in _CHANGES, change
                state, ticket = getattr(s, change)()
            return self._view(s, state), ticket

        view, ticket = await self._run(run)
        await self.durable(ticket)
        return view

    # ---- normalization

    def check_answer(
        self,
        x: torch.Tensor,
        statistics_only: bool,
        what: str = "call",
        statistics: int | None = None,
    ) -> None:
        """Refuses, before anything is applied, a call whose answer could not be sent.
        ``statistics``: how many values each of the answer's mean and var has (its kind's
        ``statistics_numel``; default x.shape[1], batch norm's)."""
        out = 0 if statistics_only else x.numel() * x.element_size()
        stats = x.shape[1] if statistics is None else statistics
        size = out + 8 * stats + ANSWER_OVERHEAD_BYTES
        if size > self.max_answer_bytes:
            shape = ", ".join(str(d) for d in x.shape)
            raise ResourceExhausted(
                f"the answer to this {what} (output [{shape}] {str(x.dtype)[6:]}, {out} bytes) "
                f"would exceed the server's message limit of {self.max_answer_bytes} bytes; "
                "send the batch through NormalizeStream in smaller chunks; nothing was applied"
            )

    def check_batch_answer(self, batch: ChunkedBatch, index: int) -> None:
        """Refuses, before anything is applied, a streamed batch whose first answer (the whole
        batch's statistics, with its first output chunk) could not be sent: per-sample statistics
        grow with the batch, not with the chunk."""
        shape = batch.shape
        if shape is None or not batch.keeps_statistics:
            return
        stats = batch.session.kind.statistics_numel(shape)
        out = 0 if batch.statistics_only else batch.first_chunk_bytes
        if out + 8 * stats + ANSWER_OVERHEAD_BYTES > self.max_answer_bytes:
            raise ResourceExhausted(
                f"the statistics of batch {index} of this stream ({stats} values each of mean and "
                f"var, for input [{', '.join(str(d) for d in shape)}]) and its first output chunk "
                f"would exceed the server's message limit of {self.max_answer_bytes} bytes; send "
                "smaller batches (end_of_batch sooner); nothing of the batch was applied"
            )

    async def normalize(self, call: NormalizeCall, encode: Callable[[NormalizeResult], T]) -> T:
        """One batch: look up, decode, check, compute (inline or on the pool), encode; its bytes
        count against the tenant's in-flight quota meanwhile."""
        if not call.nbytes:
            return await self._normalize(call, encode)
        quotas, tenant = self.quotas, self.tenant
        quotas.acquire_inflight(tenant, call.nbytes)
        try:
            return await self._normalize(call, encode)
        finally:
            quotas.release_inflight(tenant, call.nbytes)

    async def _normalize(self, call: NormalizeCall, encode: Callable[[NormalizeResult], T]) -> T:
        t0 = perf_counter()
        session = self.sessions.get(call.session_id)
        mode = call.mode()
        self.stages.label(session.config.kind.value, mode.value)
        x = call.tensor()
        t1 = perf_counter()
        session.check_input(x)
        session.kind.at(call.time_step)  # a wrong time step is refused before anything else
        self.check_answer(
            x, call.statistics_only, statistics=session.kind.statistics_numel(x.shape)
        )
        if call.sync is not None:
            if not session.config.sync_participants:
                raise InvalidArgument(
                    "sync",
                    f"session {session.session_id!r} is not synchronized (its config has no sync "
                    "group); send no sync",
                )
            if mode is Mode.TRAIN:
                synced = await self._normalize_sync(session, x, call.statistics_only, call.sync)
                t2 = perf_counter()
                answer = encode(synced)
                self.record(
                    "Normalize", session, mode, synced, x.numel(), t1 - t0, perf_counter() - t2
                )
                return answer
        result = None
        key = call.idempotency_key
        if (
            self.local_store
            and x.numel() * x.element_size() <= INLINE_BYTES
            and session.device.type == "cpu"  # CUDA work goes to the workers' own streams
        ):
            # a thread hop costs more than this work; never wait for a lock on the loop, though
            with contextlib.suppress(Busy):
                result = session.normalize(
                    x, mode, call.statistics_only, False, key, call.time_step, call.adaptation
                )
        if result is None:
            result = await self.compute(
                session.normalize,
                x,
                mode,
                call.statistics_only,
                True,
                key,
                call.time_step,
                call.adaptation,
            )
        await self.durable(result.durable)
        t2 = perf_counter()
        answer = encode(result)
        self.record("Normalize", session, mode, result, x.numel(), t1 - t0, perf_counter() - t2)
        return answer

    async def _normalize_sync(
        self, session: Session, x: torch.Tensor, statistics_only: bool, sync: SyncStep
    ) -> NormalizeResult:
        """One participant's batch of a synchronized TRAIN step (see ``_groups``)."""
        t0 = perf_counter()
        if x.device != session.device:
            x = _device.to_device(x, session.device)
        kind = session.kind
        moments = kind.chunk_statistics(x, None)  # [C]-sized: float64 Chan merges after
        count = x.numel() // x.shape[1]
        t_wait = perf_counter()
        fwd, replayed = await self.sync_forward(session, moments, count, list(x.shape), sync)
        waited = perf_counter() - t_wait  # the rendezvous (and the combine) as the wait stage
        out = None
        if not statistics_only:
            if fwd.prepared is None or x.numel() == 0:
                out = torch.empty_like(x)
            else:
                out = await self.compute(kind.normalize_chunk, x, fwd.prepared, fwd.state)
        step = fwd.step.value
        compute = perf_counter() - t0 - waited
        session.touch()
        mean, var = step.mean.float(), step.var.float()
        return NormalizeResult(out, mean, var, fwd.version, True, waited, compute, replayed)

    async def sync_forward(
        self, session: Session, moments: Any, count: int, shape: list[int], sync: SyncStep
    ) -> tuple[_SyncForward, bool]:
        """One participant's forward statistics (``moments`` over ``count`` values per channel
        of a batch shaped ``shape``) through the group's rendezvous; returns the step's global
        statistics, durable, and whether they were a completed step's, replayed. Unary and
        streamed batches join the same way."""

        async def combine(parts: list[tuple[Any, int]]) -> _SyncForward:
            merged = None
            for m, _ in parts:  # in rank order: every participant's statistics are the same bits
                if m is not None:
                    merged = m if merged is None else ops.merge_moments(merged, m)
            total = sum(n for _, n in parts)
            if total == 1:
                raise InvalidArgument(
                    "input.shape",
                    "batch statistics need more than 1 value per channel over the group, got 1",
                )
            return await self.compute(self._sync_commit, session, merged, [total, *shape[1:]])

        group = session_group(self, session)
        if getattr(group, "shared", False):
            return await self._sync_forward_shared(group, session, moments, count, shape, sync)
        fwd, replayed = await group.forward.gather(sync, (moments, count), combine)
        await self.durable(fwd.step.durable)
        return fwd, replayed

    async def _sync_forward_shared(
        self, group: Any, session: Session, moments: Any, count: int, shape: list[int], sync: Any
    ) -> tuple[_SyncForward, bool]:
        """``sync_forward`` through a rendezvous shared across processes: the combine (in
        whichever process the last participant reached) merges and commits once per step, with
        an idempotency key of the session and step; it publishes the merged moments and the
        version, from which every participant derives the same statistics."""
        key = Idempotency(f"sync:{session.record.uid}:{sync.step}", "sync-forward")

        async def combine(parts: list[tuple[Any, int]]) -> tuple[Any, int, int]:
            merged = None
            for m, _ in parts:  # in rank order: every participant's statistics are the same bits
                if m is not None:
                    merged = m if merged is None else ops.merge_moments(merged, m)
            total = sum(n for _, n in parts)
            if total == 1:
                raise InvalidArgument(
                    "input.shape",
                    "batch statistics need more than 1 value per channel over the group, got 1",
                )
            fwd = await self.compute(self._sync_commit, session, merged, [total, *shape[1:]], key)
            await self.durable(fwd.step.durable)
            return merged, total, fwd.version

        (merged, total, version), replayed = await group.forward.gather(
            sync, (moments, count), combine
        )
        fwd = await self.compute(self._sync_local, session, merged, [total, *shape[1:]], version)
        return fwd, replayed

    @staticmethod
    def _sync_local(session: Session, merged: Any, shape: list[int], version: int) -> _SyncForward:
        """A step's global statistics as this participant normalizes with them (its weight and
        bias), without committing: the combine committed them."""
        state = session.read_state(touch=False)
        step, prepared = session.kind.finish(
            merged, shape, state, Mode.TRAIN, state.num_batches_tracked
        )
        return _SyncForward(_Committed(step, None), prepared, state, version)

    @staticmethod
    def _sync_commit(
        session: Session, merged: Any, shape: list[int], idempotency: Idempotency | None = None
    ) -> _SyncForward:
        """The group's merged statistics committed as one update of the running statistics
        (once per ``idempotency`` key, where one is given)."""
        kind = session.kind
        prepared: list[Any] = []

        def compute(s: SessionState, n: int) -> Any:
            step, prep = kind.finish(merged, shape, s, Mode.TRAIN, n)
            prepared[:] = [prep]
            return step

        if kind.updates_running(Mode.TRAIN):
            step, version, _, ticket, _ = session.update(
                compute, "input", merged is None, idempotency=idempotency
            )
            state = session.read_state(touch=False)
        else:
            state = session.read_state(touch=False)
            step, version, ticket = compute(state, state.num_batches_tracked), state.version, None
            session.check_step(step, "input", merged is None)
        return _SyncForward(_Committed(step, ticket), prepared[0], state, version)

    async def sync_reduce(
        self,
        session_id: str,
        sync: SyncStep,
        sum_dy: torch.Tensor,
        sum_dy_xhat: torch.Tensor,
        count: int,
    ) -> SyncReduced:
        """One participant's backward sums of a synchronized step; the group's, once all came."""
        session = self.sessions.get(session_id)
        if not session.config.sync_participants:
            raise InvalidArgument(
                "sync", f"session {session.session_id!r} is not synchronized (no sync group)"
            )
        c = session.config.num_features
        for name, t in (("sum_dy", sum_dy), ("sum_dy_xhat", sum_dy_xhat)):
            if tuple(t.shape) != (c,) or not t.dtype.is_floating_point:
                raise InvalidArgument(
                    name, f"expected a float32 tensor of shape [{c}], got {t.dtype} {list(t.shape)}"
                )
        parts = (sum_dy.detach().cpu(), sum_dy_xhat.detach().cpu(), count)

        async def combine(all_parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> Any:
            return reduce_sums(all_parts)

        (dy, dy_xhat, total), replayed = await session_group(self, session).backward.gather(
            sync, parts, combine
        )
        session.touch()
        return SyncReduced(dy, dy_xhat, total, replayed)

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

    async def stream(
        self, chunks: AsyncIterator[tuple[Chunk, int]], encoder: StreamEncoder[T]
    ) -> AsyncIterator[T]:
        """Many batches on one stream, chunked along dim 0; see ``_stream.serve_stream``. Each
        chunk comes with the bytes it arrived in, counted against the tenant's in-flight quota
        while it is processed; the stream itself holds one of the tenant's open streams."""
        quotas, tenant = self.quotas, self.tenant
        quotas.open_stream(tenant)
        metered = _Metered(chunks, quotas, tenant)
        try:
            async for answer in serve_stream(self, metered, encoder):
                yield answer
        finally:
            metered.release()
            quotas.close_stream(tenant)


_CHANGES = frozenset(
    {
        "start_calibration",
        "commit_calibration",
        "abort_calibration",
        "reset_adaptation",
        "promote_adaptation",
    }
)


@dataclass(frozen=True)
class _Committed:
    value: Any
    durable: Ticket


def session_group(service: NormalizerService, session: Session) -> Any:
    """The rendezvous of a synchronized session."""
    return service.groups.of(session)


class _Metered:
    """Chunks of a stream, each counted in flight from its arrival until the next is asked for
    (by then it is computed; what a batch keeps of it is the stream's buffer, bounded apart)."""

    def __init__(
        self, chunks: AsyncIterator[tuple[Chunk, int]], quotas: TenantQuotas, tenant: str
    ) -> None:
        self._chunks, self._quotas, self._tenant = chunks, quotas, tenant
        self._held = 0

    def __aiter__(self) -> _Metered:
        return self

    async def __anext__(self) -> Chunk:
        self.release()
        chunk, nbytes = await anext(self._chunks)
        self._quotas.acquire_inflight(self._tenant, nbytes)
        self._held = nbytes
        return chunk

    def release(self) -> None:
        if self._held:
            self._quotas.release_inflight(self._tenant, self._held)
            self._held = 0
