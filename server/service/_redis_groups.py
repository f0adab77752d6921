"""The rendezvous of synchronized sessions through Redis, for servers that share a Redis store.

The same rules as ``_groups`` (the in-process rendezvous, kept for memory and local stores), but
a step's participants may reach different processes or replicas: their contributions meet in
Redis. Per session (store key K, hash tag ``{K}``; U its creation id, so a session deleted and
created again under the same id starts afresh), phase P (``f`` forward, ``b`` backward):

- ``NS:g:{K}:U:P:STEP``, a hash: ``pR`` (rank R's contribution, ``frame``d bytes), ``n`` (how
  many arrived), ``a`` (the attempt: +1 at each abort), ``dl`` (the attempt's deadline, Redis's
  clock in microseconds, set by its first arrival), ``st`` (``c`` all arrived, combining; ``d``
  done), ``lease`` (until when the combiner holds the combine), ``res`` (the result), ``wA``
  (why attempt A ended: an error to raise), ``late`` and ``lateto`` (the ranks that missed a
  timed-out attempt, each answered ABORTED once if it arrives before ``lateto``);
- the session's own hash (the store's ``NS:s:{K}``), fields ``sync:f`` and ``sync:b``: the last
  completed step of each phase (20-digit decimal: Lua compares the strings, so steps up to
  2**64 - 1 compare exactly); it lives and goes with the session, so a stale step is refused for
  as long as the session lives;
- ``NS:gr:{K}:U:P``, a list of the last ``REMEMBERED`` completed steps, whose hashes are deleted
  as they fall off it.

The group's own keys expire ``KEY_TTL`` (or 4 timeouts, if longer) after their last write: what a
deleted session or an abandoned group leaves goes by itself.

Each change is one Lua script, so atomic: the K-th arrival closes the step and gets every
contribution; exactly that process combines them (rank order, ``combine``), commits the running
update through the session with an idempotency key derived from the session's id and the step
(a combine run twice, after a crash or a lost answer, applies once), writes the result and
publishes the step's key on ``NS:sync``. Waiting holds no thread: each process has one listener
thread on that channel, which wakes the waiters' asyncio events; a waiter also polls every
``POLL`` seconds (a missed notification, a listener reconnecting). A waiter past its step's
deadline aborts it (a script: only an open step of the same attempt), so a timeout is enforced
while any participant waits, and a late arrival finds it aborted too. A combiner that dies leaves
its lease to run out; a waiting participant then takes the combine over.

Redis unreachable: the calls fail with Unavailable; a step is applied once whatever was sent
before, so a participant retries (the same rank sending the same contribution again rejoins its
step, rather than counting as a duplicate).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Generic, TypeVar

import redis
import torch

from normserve.server import ops
from normserve.server.service._errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from normserve.server.service._groups import REMEMBERED, SyncStep
from normserve.server.service._sync_codec import pack, pack_moments, unpack, unpack_moments
from normserve.server.service.stores._codec import CorruptData

__all__ = ["KEY_TTL", "POLL", "RedisGroups"]

log = logging.getLogger("normserve.sync")

T = TypeVar("T")

#: Seconds between a waiter's looks at its step when no notification came.
POLL = 0.5
#: Seconds a group's keys outlive their last write (at least; 4 group timeouts if longer).
KEY_TTL = 3600.0


#: The errors a combine may end a step with, as they travel to every waiting participant.
_ERRORS: dict[str, type[ServiceError]] = {
    c.__name__: c for c in (Aborted, Unavailable, NotFound, FailedPrecondition, ResourceExhausted)
}


def _error(err: ServiceError) -> bytes:
    """An error as the step's participants in every process will raise it (see ``_raise``)."""
    if isinstance(err, InvalidArgument):
        return f"InvalidArgument\n{err.field}\n{err}".encode()
    name = next((n for n, c in _ERRORS.items() if isinstance(err, c)), "Aborted")
    return f"{name}\n\n{err}".encode()


def _raise(why: bytes) -> ServiceError:
    name, field, message = why.decode(errors="replace").split("\n", 2)
    if name == "InvalidArgument":
        # its str is "field: message": give it back as it was raised
        return InvalidArgument(field, message.removeprefix(f"{field}: "))
    return _ERRORS.get(name, Aborted)(message)


# ---- the scripts

_LIB = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
-- the group's keys (never the session's hash, KEYS[2]: its TTL is the session's)
local function keep(ttl)
  redis.call('PEXPIRE', KEYS[1], ttl)
  if KEYS[3] then redis.call('PEXPIRE', KEYS[3], ttl) end
end
-- ends the open attempt: its contributions go, the next arrival starts a new one
local function abort(h, why, late, lateto)
  local a = tonumber(redis.call('HGET', h, 'a') or '0')
  local fields = redis.call('HKEYS', h)
  for _, f in ipairs(fields) do
    if string.sub(f, 1, 1) == 'p' or f == 'n' or f == 'dl' or f == 'st' or f == 'lease' then
      redis.call('HDEL', h, f)
    end
  end
  redis.call('HSET', h, 'a', a + 1, 'w' .. a, why)
  if late then redis.call('HSET', h, 'late', late, 'lateto', lateto) end
end
-- a timed-out attempt: its message (the template's @N@ and @R@ filled in with how many ranks
-- were missing and which) and the missing ranks as ",1,3,"
local function missing(h, k, template)
  local late, shown, n = ',', {}, 0
  for r = 0, k - 1 do
    if redis.call('HEXISTS', h, 'p' .. r) == 0 then
      late = late .. r .. ','
      n = n + 1
      if n <= 16 then shown[#shown + 1] = tostring(r) end
    end
  end
  local ranks = table.concat(shown, ', ')
  if n > 16 then ranks = ranks .. ', ...' end
  local why = string.gsub(template, '@N@', tostring(n))
  why = string.gsub(why, '@R@', ranks)
  return why, late
end
"""

# KEYS: step hash, session hash, remembered list. ARGV: rank, K, blob, timeout us, padded step,
# key ttl ms, lease us, timeout message (see missing()), channel, last-step field.
# -> {'done', res} | {'stale', last} | {'dup'} | {'late', why} | {'wait', a, dl - now}
#    | {'combine', a, p0, ..., pK-1}
_ARRIVE = (
    _LIB
    + """
local h = KEYS[1]
local rank, k = ARGV[1], tonumber(ARGV[2])
local st = redis.call('HGET', h, 'st')
if st == 'd' then return {'done', redis.call('HGET', h, 'res')} end
local last = redis.call('HGET', KEYS[2], ARGV[10])
if last and ARGV[5] <= last then return {'stale', last} end
local now = now_us()
local a = tonumber(redis.call('HGET', h, 'a') or '0')
local mine = redis.call('HGET', h, 'p' .. rank)
if st == 'c' then
  -- all arrived: the same participant again (a retry) waits with the others
  if mine == ARGV[3] then return {'wait', a, 0} end
  return {'dup'}
end
local dl = redis.call('HGET', h, 'dl')
if dl and now > tonumber(dl) then
  -- an attempt past its deadline that no waiter aborted (they all went): abort it now
  local why, late = missing(h, k, ARGV[8])
  abort(h, why, late, now + tonumber(ARGV[4]))
  redis.call('PUBLISH', ARGV[9], h)
  a = a + 1
  dl = nil
  mine = nil
end
local late = redis.call('HGET', h, 'late')
if late then
  local tag = ',' .. rank .. ','
  local at = string.find(late, tag, 1, true)
  if at and now <= tonumber(redis.call('HGET', h, 'lateto')) then
    redis.call('HSET', h, 'late', string.sub(late, 1, at) .. string.sub(late, at + #tag))
    return {'late', redis.call('HGET', h, 'w' .. (a - 1))}
  end
end
if mine then
  if mine == ARGV[3] then return {'wait', a, tonumber(dl) - now} end
  return {'dup'}
end
if not dl then
  dl = now + tonumber(ARGV[4])
  redis.call('HSET', h, 'dl', dl)
end
redis.call('HSET', h, 'p' .. rank, ARGV[3])
local n = redis.call('HINCRBY', h, 'n', 1)
keep(ARGV[6])
if n < k then return {'wait', a, tonumber(dl) - now} end
redis.call('HSET', h, 'st', 'c', 'lease', now + tonumber(ARGV[7]))
local out = {'combine', a}
for r = 0, k - 1 do out[#out + 1] = redis.call('HGET', h, 'p' .. r) end
return out
"""
)

# KEYS: step hash. ARGV: attempt.
# -> {'done', res} | {'ended', why} | {'open', dl - now} | {'closed', lease - now}
_CHECK = (
    _LIB
    + """
local h = KEYS[1]
local r = redis.call('HMGET', h, 'st', 'a', 'res', 'dl', 'lease')
if r[1] == 'd' then return {'done', r[3]} end
local a = tonumber(r[2] or '0')
if a ~= tonumber(ARGV[1]) then
  return {'ended', redis.call('HGET', h, 'w' .. ARGV[1]) or 'Aborted\\n\\nthe step ended'}
end
local now = now_us()
if r[1] == 'c' then return {'closed', tonumber(r[5]) - now} end
if not r[4] then return {'ended', 'Aborted\\n\\nthe step ended'} end
return {'open', tonumber(r[4]) - now}
"""
)

# KEYS: step hash. ARGV: attempt, why, 'timeout' or 'cancel', channel, timeout us, K, key ttl ms.
# -> 1 (aborted) or 0 (not: another attempt, done, combining, or not yet past its deadline).
_ABORT = (
    _LIB
    + """
local h = KEYS[1]
local r = redis.call('HMGET', h, 'st', 'a', 'dl')
if r[1] or not r[3] or tonumber(r[2] or '0') ~= tonumber(ARGV[1]) then return 0 end
local now = now_us()
if ARGV[3] == 'timeout' then
  if now <= tonumber(r[3]) then return 0 end
  local why, late = missing(h, tonumber(ARGV[6]), ARGV[2])
  abort(h, why, late, now + tonumber(ARGV[5]))
else
  abort(h, ARGV[2])
end
keep(ARGV[7])
redis.call('PUBLISH', ARGV[4], h)
return 1
"""
)

# KEYS: step hash. ARGV: attempt, lease us. -> {p0, ..., pK-1} (the combine is ours) or {}.
_CLAIM = (
    _LIB
    + """
local h = KEYS[1]
local r = redis.call('HMGET', h, 'st', 'a', 'lease', 'n')
if r[1] ~= 'c' or tonumber(r[2] or '0') ~= tonumber(ARGV[1]) then return {} end
local now = now_us()
if now <= tonumber(r[3]) then return {} end
redis.call('HSET', h, 'lease', now + tonumber(ARGV[2]))
local out = {}
for i = 0, tonumber(r[4]) - 1 do out[#out + 1] = redis.call('HGET', h, 'p' .. i) end
return out
"""
)

# KEYS: step hash, session hash, remembered list. ARGV: attempt, result, padded step, channel,
# key ttl ms, remembered, prefix of step hashes, last-step field. -> 1, or 0 (the step was not ours to finish).
_FINISH = (
    _LIB
    + """
local h = KEYS[1]
local r = redis.call('HMGET', h, 'st', 'a')
if r[1] ~= 'c' or tonumber(r[2] or '0') ~= tonumber(ARGV[1]) then return 0 end
local fields = redis.call('HKEYS', h)
for _, f in ipairs(fields) do
  if string.sub(f, 1, 1) == 'p' then redis.call('HDEL', h, f) end
end
redis.call('HSET', h, 'st', 'd', 'res', ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then  -- a session deleted meanwhile stays deleted
  local last = redis.call('HGET', KEYS[2], ARGV[8])
  if not last or ARGV[3] > last then redis.call('HSET', KEYS[2], ARGV[8], ARGV[3]) end
end
redis.call('LPUSH', KEYS[3], ARGV[3])
local gone = redis.call('LRANGE', KEYS[3], tonumber(ARGV[6]), -1)
for _, s in ipairs(gone) do redis.call('DEL', ARGV[7] .. s) end
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[6]) - 1)
keep(ARGV[5])
redis.call('PUBLISH', ARGV[4], h)
return 1
"""
)

# KEYS: step hash. ARGV: attempt, why, channel, key ttl ms. The combine failed: every waiter
# gets its error, and the step may be sent again. -> 1 or 0.
_FAIL = (
    _LIB
    + """
local h = KEYS[1]
local r = redis.call('HMGET', h, 'st', 'a')
if r[1] ~= 'c' or tonumber(r[2] or '0') ~= tonumber(ARGV[1]) then return 0 end
abort(h, ARGV[2])
keep(ARGV[4])
redis.call('PUBLISH', ARGV[3], h)
return 1
"""
)


class _Listener:
    """One thread per process on the notification channel, waking the waiters of a step."""

    def __init__(self, client: redis.Redis, channel: str) -> None:
        self._client, self._channel = client, channel
        self._waiters: dict[bytes, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, key: bytes, event: asyncio.Event) -> Callable[[], None]:
        """Sets ``event`` (on its loop) whenever ``key`` is published; returns the unwatch."""
        entry = (asyncio.get_running_loop(), event)
        with self._lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="normserve-sync-listener", daemon=True
                )
                self._thread.start()
            self._waiters.setdefault(key, set()).add(entry)

        def unwatch() -> None:
            with self._lock:
                found = self._waiters.get(key)
                if found is not None:
                    found.discard(entry)
                    if not found:
                        del self._waiters[key]

        return unwatch

    def _run(self) -> None:
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self._channel)
                msg = pubsub.get_message(timeout=1.0)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                # Redis away: the waiters poll meanwhile; subscribe again once it is back
                if pubsub is not None:
                    with suppress(Exception):  # a broken connection may fail to close
                        pubsub.close()
                pubsub = None
                self._stop.wait(POLL)
                continue
            if msg is None or msg.get("type") != "message":
                continue
            with self._lock:
                found = list(self._waiters.get(msg["data"], ()))
            for loop, event in found:
                with suppress(RuntimeError):  # its loop closed: nobody waits there any more
                    loop.call_soon_threadsafe(event.set)
        if pubsub is not None:
            pubsub.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class RedisPhase(Generic[T]):
    """One rendezvous (forward statistics or backward sums) of a session, through Redis; the
    same ``gather`` as ``_groups.Phase``. ``encode``/``decode`` turn a contribution into bytes
    and back, ``encode_result``/``decode_result`` the combine's result."""

    shared = True

    def __init__(
        self,
        groups: RedisGroups,
        name: str,
        what: str,
        prefix: str,
        session_hash: str,
        participants: int,
        timeout: float,
        encode: Callable[[Any], bytes],
        decode: Callable[[bytes], Any],
        encode_result: Callable[[T], bytes],
        decode_result: Callable[[bytes], T],
    ) -> None:
        self._g = groups
        self.name, self.what = name, what
        self.participants, self.timeout = participants, timeout
        self._prefix = prefix  # "NS:g:{K}:U:P:"
        self._last = session_hash
        self._field = f"sync:{prefix.rstrip(':').rsplit(':', 1)[-1]}"  # sync:f, sync:b
        self._remembered = prefix.replace(":g:", ":gr:", 1).rstrip(":")
        self._encode, self._decode = encode, decode
        self._encode_result, self._decode_result = encode_result, decode_result
        self._timeout_us = round(timeout * 1e6)
        self._ttl_ms = round(max(KEY_TTL, 4 * timeout) * 1000)

    def _timed_out(self, step: int) -> str:
        """The message of a timed-out step, as an error (see _raise); Lua fills in the ranks."""
        return (
            f"Aborted\n\n{self.name} step {step} of {self.what}: @N@ of {self.participants} "
            f"participants (ranks @R@) did not arrive within {self.timeout:g} seconds; nothing "
            "was applied"
        )

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
        """As ``_groups.Phase.gather``, the participants in any process on this Redis."""
        self._check(sync)
        step, rank = sync.step, sync.rank
        padded = f"{step:020d}"
        h = f"{self._prefix}{padded}"
        blob = self._encode(contribution)
        timed_out = self._timed_out(step)
        arriving = asyncio.ensure_future(
            self._g.call(
                self._g.arrive,
                [h, self._last, self._remembered],
                [
                    rank,
                    self.participants,
                    blob,
                    self._timeout_us,
                    padded,
                    self._ttl_ms,
                    self._timeout_us,
                    timed_out,
                    self._g.channel,
                    self._field,
                ],
                sync,
                self,
            )
        )
        try:
            answer = await asyncio.shield(arriving)
        except asyncio.CancelledError:
            # cancelled while its arrival was on the way: once it lands, leave the step as a
            # waiting participant would (or combine it, if it was the last to arrive)
            arriving.add_done_callback(lambda f: self._arrived_gone(f, h, padded, combine, sync))
            raise
        kind = answer[0]
        if kind == b"done":
            return self._decode_result(answer[1]), True
        if kind == b"stale":
            raise InvalidArgument(
                "sync.step",
                f"step {step} of {self.what} is stale: step {int(answer[1])} has completed, and "
                f"only the last {REMEMBERED} completed steps are answered again",
            )
        if kind == b"dup":
            raise InvalidArgument(
                "sync.rank",
                f"rank {rank} already arrived at {self.name} step {step} of {self.what}, which "
                "is still waiting for others: each participant needs a rank of its own",
            )
        if kind == b"late":
            raise _late(answer[1])
        attempt = int(answer[1])
        if kind == b"combine":
            self._g.spawn(self._combine(h, padded, attempt, list(answer[2:]), combine, sync))
        return await self._wait(h, padded, attempt, combine, sync)

    def _arrived_gone(
        self,
        arrived: asyncio.Future[Any],
        h: str,
        padded: str,
        combine: Callable[[list[Any]], Awaitable[T]],
        sync: SyncStep,
    ) -> None:
        if arrived.cancelled() or arrived.exception() is not None:
            return
        answer = arrived.result()
        if answer[0] == b"combine":
            self._g.spawn(self._combine(h, padded, int(answer[1]), list(answer[2:]), combine, sync))
        elif answer[0] == b"wait":
            self._leave(h, int(answer[1]), sync)

    def _leave(self, h: str, attempt: int, sync: SyncStep) -> None:
        """Aborts the step's open attempt for all: this participant's call was cancelled."""
        why = _error(
            Aborted(
                f"participant {sync.rank} left {self.name} step {sync.step} of {self.what} "
                "(its call was cancelled); nothing was applied, send the step again"
            )
        )
        self._g.fire(
            self._g.abort, [h], [attempt, why, "cancel", self._g.channel, 0, 0, self._ttl_ms]
        )

    async def _wait(
        self,
        h: str,
        padded: str,
        attempt: int,
        combine: Callable[[list[Any]], Awaitable[T]],
        sync: SyncStep,
    ) -> tuple[T, bool]:
        event = asyncio.Event()
        unwatch = self._g.listener.watch(h.encode(), event)
        try:
            while True:
                event.clear()
                state = await self._g.call(self._g.check, [h], [attempt], sync, self)
                kind = state[0]
                if kind == b"done":
                    return self._decode_result(state[1]), False
                if kind == b"ended":
                    raise _raise(state[1])
                left = int(state[1]) / 1e6
                if left <= 0:
                    if kind == b"open":
                        await self._g.call(
                            self._g.abort,
                            [h],
                            [
                                attempt,
                                self._timed_out(sync.step),
                                "timeout",
                                self._g.channel,
                                self._timeout_us,
                                self.participants,
                                self._ttl_ms,
                            ],
                            sync,
                            self,
                        )
                    else:  # the combiner's lease ran out (it died): take the combine over
                        parts = await self._g.call(
                            self._g.claim, [h], [attempt, self._timeout_us], sync, self
                        )
                        if parts:
                            self._g.spawn(self._combine(h, padded, attempt, parts, combine, sync))
                    continue
                with suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(left, POLL))
        except asyncio.CancelledError:
            self._leave(h, attempt, sync)
            raise
        finally:
            unwatch()

    async def _combine(
        self,
        h: str,
        padded: str,
        attempt: int,
        blobs: list[bytes],
        combine: Callable[[list[Any]], Awaitable[T]],
        sync: SyncStep,
    ) -> None:
        try:
            try:
                result = await combine([self._decode(b) for b in blobs])
                blob = self._encode_result(result)
            except ServiceError as err:  # every participant gets the combine's error
                await self._g.call(
                    self._g.fail, [h], [attempt, _error(err), self._g.channel, self._ttl_ms]
                )
                return
            except CorruptData as err:
                failed = Aborted(f"{self.name} step {sync.step} of {self.what}: {err}")
                await self._g.call(
                    self._g.fail, [h], [attempt, _error(failed), self._g.channel, self._ttl_ms]
                )
                return
            await self._g.call(
                self._g.finish,
                [h, self._last, self._remembered],
                [
                    attempt,
                    blob,
                    padded,
                    self._g.channel,
                    self._ttl_ms,
                    REMEMBERED,
                    self._prefix,
                    self._field,
                ],
            )
        except Exception:
            # Redis away, or a bug: the lease runs out and a waiting participant takes over
            log.warning("combining %s step %s of %s failed", self.name, sync.step, self.what)


def _late(why: bytes | None) -> ServiceError:
    return _raise(why) if why else Aborted("the step was aborted; nothing was applied")


class RedisGroup:
    """A synchronized session's two rendezvous through Redis."""

    shared = True

    def __init__(self, forward: RedisPhase[Any], backward: RedisPhase[Any]) -> None:
        self.forward, self.backward = forward, backward


class RedisGroups:
    """The rendezvous of every synchronized session of a server on a Redis store (``of``, as
    ``_groups.Groups``); one listener thread, started at the first wait."""

    shared = True

    def __init__(self, client: redis.Redis, namespace: str, url: str) -> None:
        self._redis = client
        self._ns = namespace
        self.url = url
        self.channel = f"{namespace}:sync"
        self.listener = _Listener(client, self.channel)
        self.arrive = client.register_script(_ARRIVE)
        self.check = client.register_script(_CHECK)
        self.abort = client.register_script(_ABORT)
        self.claim = client.register_script(_CLAIM)
        self.finish = client.register_script(_FINISH)
        self.fail = client.register_script(_FAIL)
        # Redis round trips only (short); the waiting is on the loop
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sync-redis")
        self._tasks: set[asyncio.Future[None]] = set()

    def of(self, session: Any) -> RedisGroup:
        cfg = session.config
        what = f"session {session.session_id!r}"
        base = f"{self._ns}:g:{{{session.key}}}:{session.record.uid}"
        session_hash = f"{self._ns}:s:{{{session.key}}}"  # the store's (see stores._redis)
        device = session.device
        forward: RedisPhase[Any] = RedisPhase(
            self,
            "forward",
            what,
            f"{base}:f:",
            session_hash,
            cfg.sync_participants,
            cfg.sync_timeout,
            lambda part: pack_moments(part[0], [part[1]]),
            lambda blob: _moments_part(blob, device),
            lambda res: pack_moments(res[0], [res[1], res[2]]),
            lambda blob: _moments_result(blob, device),
        )
        backward: RedisPhase[Any] = RedisPhase(
            self,
            "backward",
            what,
            f"{base}:b:",
            session_hash,
            cfg.sync_participants,
            cfg.sync_timeout,
            lambda part: pack([part[2]], [part[0].float(), part[1].float()]),
            _sums,
            lambda res: pack([res[2]], [res[0].float(), res[1].float()]),
            _sums,
        )
        return RedisGroup(forward, backward)

    async def call(
        self,
        script: Any,
        keys: list[Any],
        args: list[Any],
        sync: SyncStep | None = None,
        phase: RedisPhase[Any] | None = None,
    ) -> Any:
        """One script, on the small pool; Unavailable where Redis cannot be reached."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: script(keys=keys, args=args))
        except (redis.ConnectionError, redis.TimeoutError, OSError) as err:
            where = ""
            if sync is not None and phase is not None:
                where = f" during {phase.name} step {sync.step} of {phase.what}"
            raise Unavailable(
                f"the synchronized sessions' rendezvous, Redis at {self.url}, is unreachable"
                f"{where} ({err}); nothing was half-applied (a step is applied once): send the "
                "step again"
            ) from None

    def fire(self, script: Any, keys: list[Any], args: list[Any]) -> None:
        """A script run without waiting for it (a cancelled participant's abort)."""

        def run() -> None:
            try:
                script(keys=keys, args=args)
            except Exception as err:  # Redis away: the step times out instead
                log.warning("a sync abort could not reach Redis at %s: %s", self.url, err)

        with suppress(RuntimeError):  # shut down: the server is stopping, the step times out
            self._pool.submit(run)

    def spawn(self, coro: Awaitable[None]) -> None:
        """A task of its own, held: it finishes even if the call that started it is cancelled."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        self.listener.close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _moments_part(blob: bytes, device: torch.device) -> tuple[ops.Moments | None, int]:
    m, ints = unpack_moments(blob, device)
    return m, ints[0]


def _moments_result(blob: bytes, device: torch.device) -> tuple[ops.Moments | None, int, int]:
    m, ints = unpack_moments(blob, device)
    return m, ints[0], ints[1]


def _sums(blob: bytes) -> tuple[torch.Tensor, torch.Tensor, int]:
    ints, ts = unpack(blob)
    if len(ints) != 1 or len(ts) != 2 or ts[0] is None or ts[1] is None:
        raise CorruptData("backward sums need two tensors and a count")
    return ts[0], ts[1], ints[0]
