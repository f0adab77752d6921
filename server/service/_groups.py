"""Synchronized batch norm: the rendezvous of a group's participants, one step at a time.

A synchronized session (``SessionConfig.sync_participants`` = K) takes, for each step, one TRAIN
batch from each of its K participants. Each participant's per-channel moments (count, mean, M2,
pivot-shifted as ``ops.moments`` computes them) wait here until all K have arrived; the last
arrival's combine merges them in rank order with Chan's formula (``ops.merge_moments``), commits
the running update once through the session (its lock, its store), and every participant then
normalizes its own batch with the global statistics. The backward reductions (sum of dy and of
dy * x_hat per channel) meet the same way, in a phase of their own.

Waiting holds no thread: a participant awaits an asyncio future, so K may exceed the compute pool.

Rules (each tested in tests/service/test_groups.py and tests/grpc/test_sync.py):
- a step that some participant does not reach within the group's timeout of its first arrival
  fails for all with Aborted, nothing applied; a waiting participant whose call is cancelled (its
  client died or gave up) fails the step for all at once, rather than at the timeout: the others
  learn now, and can retry the step together;
- a rank outside [0, K), a rank that already arrived at a pending step, or a step at or before the
  last completed one that is no longer remembered, is InvalidArgument;
- a completed step sent again (a retry) is answered from the last ``REMEMBERED`` steps' results,
  nothing applied again;
- an aborted step is forgotten: its participants may send it again.

This rendezvous is in this process, for servers whose store is their own (memory, local files).
A server on a store shared across processes (Redis) uses ``_redis_groups`` instead, under the
same rules, so that a group's participants may reach any of its processes or replicas.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from normserve.server.service._errors import Aborted, InvalidArgument

__all__ = ["REMEMBERED", "Group", "Groups", "Phase", "SyncStep", "reduce_sums"]

T = TypeVar("T")

#: Completed steps whose answers a group keeps for retries, per phase.
REMEMBERED = 8


@dataclass(frozen=True)
class SyncStep:
    """A participant's place in a synchronized step."""

    rank: int
    step: int


class _Pending:
    __slots__ = ("contributions", "future", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.contributions: dict[int, Any] = {}
        self.future: asyncio.Future[Any] = loop.create_future()
        # an aborted step whose waiters all left: its exception is still "retrieved"
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.timer: asyncio.TimerHandle | None = None


class Phase(Generic[T]):
    """One rendezvous (the forward statistics, or the backward sums) of a group."""

    def __init__(self, name: str, what: str, participants: int, timeout: float) -> None:
        self.name, self.what = name, what
        self.participants, self.timeout = participants, timeout
        self._pending: dict[int, _Pending] = {}
        self._done: OrderedDict[int, T] = OrderedDict()
        self._last = -1
        self._tasks: set[asyncio.Future[None]] = set()

    def _check(self, sync: SyncStep) -> None:
        k = self.participants
        if not 0 <= sync.rank < k:
            raise InvalidArgument(
                "sync.rank",
                f"must be in [0, {k}) for the {k} participants of {self.what}, got {sync.rank}",
            )

    async def gather(
        self, sync: SyncStep, contribution: Any, combine: Callable[[list[Any]], Awaitable[T]]
    ) -> tuple[T, bool]:
        """Adds ``contribution`` at (step, rank) and waits for the step's result: ``combine`` of
        every rank's contribution in rank order, run once by the last arrival. Returns it and
        whether it was a completed step's answer, replayed."""
        self._check(sync)
        step, rank = sync.step, sync.rank
        if step in self._done:
            return self._done[step], True
        if step <= self._last:
            raise InvalidArgument(
                "sync.step",
                f"step {step} of {self.what} is stale: step {self._last} has completed, and only "
                f"the last {REMEMBERED} completed steps are answered again",
            )
        pending = self._pending.get(step)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._pending[step] = _Pending(loop)
            pending.timer = loop.call_later(self.timeout, self._timed_out, step, pending)
        if rank in pending.contributions:
            raise InvalidArgument(
                "sync.rank",
                f"rank {rank} already arrived at {self.name} step {step} of {self.what}, which is "
                "still waiting for others: each participant needs a rank of its own",
            )
        pending.contributions[rank] = contribution
        if len(pending.contributions) == self.participants:
            self._forget(step, pending)
            # a task of its own: the combine finishes even if this call is cancelled meanwhile
            task = asyncio.ensure_future(self._complete(step, pending, combine))
            self._tasks.add(task)  # held: the loop keeps only a weak reference to a task
            task.add_done_callback(self._tasks.discard)
        try:
            return await asyncio.shield(pending.future), False
        except asyncio.CancelledError:
            self._abort(
                step,
                pending,
                f"participant {rank} left {self.name} step {step} of {self.what} (its call was "
                "cancelled); nothing was applied, send the step again",
            )
            raise

    def _forget(self, step: int, pending: _Pending) -> bool:
        if self._pending.get(step) is not pending:
            return False
        del self._pending[step]
        if pending.timer is not None:
            pending.timer.cancel()
        return True

    async def _complete(
        self, step: int, pending: _Pending, combine: Callable[[list[Any]], Awaitable[T]]
    ) -> None:
        contributions = [pending.contributions[r] for r in range(self.participants)]
        try:
            result = await combine(contributions)
        except Exception as err:  # every participant gets the combine's error
            pending.future.set_exception(err)
            return
        self._done[step] = result
        while len(self._done) > REMEMBERED:
            self._done.popitem(last=False)
        self._last = max(self._last, step)
        pending.future.set_result(result)

    def _abort(self, step: int, pending: _Pending, why: str) -> None:
        if self._forget(step, pending) and not pending.future.done():
            pending.future.set_exception(Aborted(why))

    def _timed_out(self, step: int, pending: _Pending) -> None:
        missing = [r for r in range(self.participants) if r not in pending.contributions]
        shown = ", ".join(str(r) for r in missing[:16]) + (", ..." if len(missing) > 16 else "")
        self._abort(
            step,
            pending,
            f"{self.name} step {step} of {self.what}: {len(missing)} of {self.participants} "
            f"participants (ranks {shown}) did not arrive within {self.timeout:g} seconds; "
            "nothing was applied",
        )


class Group:
    """A synchronized session's two rendezvous: forward statistics and backward sums."""

    def __init__(self, what: str, participants: int, timeout: float) -> None:
        self.forward: Phase[Any] = Phase("forward", what, participants, timeout)
        self.backward: Phase[Any] = Phase("backward", what, participants, timeout)


class Groups:
    """The groups of this process's synchronized sessions, one per session object (dropped with
    it: a deleted session's pending steps go with it)."""

    def __init__(self) -> None:
        self._groups: weakref.WeakKeyDictionary[Any, Group] = weakref.WeakKeyDictionary()

    def of(self, session: Any) -> Group:
        group = self._groups.get(session)
        if group is None:
            cfg = session.config
            what = f"session {session.session_id!r}"
            group = self._groups[session] = Group(what, cfg.sync_participants, cfg.sync_timeout)
        return group


def reduce_sums(
    parts: list[tuple[torch.Tensor, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The group's backward sums: each participant's (sum_dy, sum_dy_xhat, count) added in rank
    order in float64, returned as float32."""
    sum_dy = torch.zeros_like(parts[0][0], dtype=torch.float64)
    sum_dy_xhat = torch.zeros_like(sum_dy)
    count = 0
    for dy, dy_xhat, n in parts:
        sum_dy += dy.to(torch.float64)
        sum_dy_xhat += dy_xhat.to(torch.float64)
        count += n
    return sum_dy.float(), sum_dy_xhat.float(), count
