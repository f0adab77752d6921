"""The Redis store: sessions shared by every process and replica pointed at one Redis.

Every write is one Lua script, so it is atomic in Redis: a commit is a compare-and-set on the
session's version that records its idempotency key in the same step, and a write Redis never ran
changed nothing. With AOF on (``appendonly yes``; ``appendfsync always`` for an acknowledgement to
mean "on disk"), what was acknowledged survives a Redis restart.

Layout, per session key K (one hash tag, ``{K}``, so Redis Cluster would keep a session's keys
in one slot):

- ``NS:s:{K}``, a hash: ``v`` (the version), ``uid`` (the creation id), ``state`` and ``rec``
  (``_codec`` bytes, framed with a CRC-32), ``ttl`` (idle milliseconds, 0: none); a synchronized
  session's also ``sync:f`` and ``sync:b``, its last completed steps (see ``_redis_groups``, whose
  keys ``NS:g:{K}:...`` and ``NS:gr:{K}:...`` hold its rendezvous);
- ``NS:i:{K}``, a hash: idempotency key -> "VERSION FINGERPRINT";
- ``NS:z:{K}``, a sorted set: idempotency key by when it was applied (Redis's clock, in
  microseconds), to forget the oldest beyond the count and those past the window;
- ``NS:index``, a sorted set of every K (all scored 0, so ZRANGEBYLEX pages them in order).

A session with an idle TTL has all of its keys PEXPIREd on every use, so Redis itself frees it;
``keys()`` drops index members whose session has expired as it meets them. The index is written
by the same scripts as the session, which needs the keys in one server: this store is for a
standalone Redis (or a managed primary with replicas), not Redis Cluster.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from normserve.server.service._state import SessionState
from normserve.server.service.stores._base import (
    AlreadyApplied,
    Applied,
    Conflict,
    Idempotency,
    KeyPolicy,
    SessionRecord,
    StoreUnavailable,
    Ticket,
)
from normserve.server.service.stores._codec import (
    CorruptData,
    decode_record,
    decode_state,
    encode_record,
    encode_state,
    frame,
    unframe,
)

__all__ = ["RedisStore"]

#: Lua helpers shared by the scripts: KEYS[1..3] are a session's s, i and z keys.
_TOUCH = """
local function touch(ttl)
  if tonumber(ttl or 0) > 0 then
    redis.call('PEXPIRE', KEYS[1], ttl)
    redis.call('PEXPIRE', KEYS[2], ttl)
    redis.call('PEXPIRE', KEYS[3], ttl)
  end
end
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
"""

# KEYS: s, i, z, index. ARGV: K, version, state, rec, ttl ms, uid.
# -> 1 (created), or {state} (the key is taken: Conflict with the session there).
_CREATE = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  -- our own create, run again by a retry after its answer was lost: it succeeded
  if redis.call('HGET', KEYS[1], 'rec') == ARGV[4] then return 1 end
  return {redis.call('HGET', KEYS[1], 'state')}
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'uid', ARGV[6], 'state', ARGV[3], 'rec', ARGV[4],
           'ttl', ARGV[5])
touch(ARGV[5])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
return 1
"""
)

# KEYS: s, i, z. ARGV: expected version, new version, state, uid, idempotency key ('' for none),
# fingerprint, max keys, window us.
# -> {0} gone, {1, "VERSION FINGERPRINT"} already applied, {2, state} conflict, {3} committed.
_COMMIT = (
    _TOUCH
    + """
local cur = redis.call('HMGET', KEYS[1], 'v', 'uid', 'ttl')
if not cur[1] then return {0} end
local idem = ARGV[5]
local now = 0
if idem ~= '' then
  now = now_us()
  -- a key past the window but not yet forgotten (keys are forgotten by commits) still counts,
  -- as in the memory store: remembering longer is the safe side
  local seen = redis.call('HGET', KEYS[2], idem)
  if seen then return {1, seen} end
end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[4] then
  local state = redis.call('HGET', KEYS[1], 'state')
  -- our own commit, run again by a retry after its answer was lost: it succeeded
  if state == ARGV[3] then return {3} end
  return {2, state}
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'state', ARGV[3])
if idem ~= '' then
  redis.call('HSET', KEYS[2], idem, ARGV[2] .. ' ' .. ARGV[6])
  redis.call('ZADD', KEYS[3], now, idem)
  local function forget(ids)
    for i = 1, #ids, 1000 do
      redis.call('HDEL', KEYS[2], unpack(ids, i, math.min(i + 999, #ids)))
    end
  end
  local horizon = '(' .. string.format('%.0f', now - tonumber(ARGV[8]))
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', horizon)
  if #old > 0 then
    forget(old)
    redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', horizon)
  end
  local excess = redis.call('ZCARD', KEYS[3]) - tonumber(ARGV[7])
  if excess > 0 then
    forget(redis.call('ZRANGE', KEYS[3], 0, excess - 1))
    redis.call('ZREMRANGEBYRANK', KEYS[3], 0, excess - 1)
  end
end
touch(cur[3])
return {3}
"""
)

# KEYS: s, i, z. -> the state, or nil; restarts the idle TTL.
_READ = (
    _TOUCH
    + """
local r = redis.call('HMGET', KEYS[1], 'state', 'ttl')
if r[1] then touch(r[2]) end
return r[1]
"""
)

# KEYS: i, z. ARGV: idempotency key, window us. -> "VERSION FINGERPRINT" or nil.
_APPLIED = """
local seen = redis.call('HGET', KEYS[1], ARGV[1])
if not seen then return false end
local at = redis.call('ZSCORE', KEYS[2], ARGV[1])
local t = redis.call('TIME')
if not at or tonumber(at) < tonumber(t[1]) * 1000000 + tonumber(t[2]) - tonumber(ARGV[2]) then
  return false
end
return seen
"""

# KEYS: s, i, z, index. ARGV: K. -> how many keys were deleted.
_DROP = """
local n = redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return n
"""

# KEYS: index. ARGV: lex min, lex max, count, session key prefix ("NS:s:{").
# -> {live members, members examined, last member examined}; forgets members whose session expired.
_KEYS = """
local found = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
local live = {}
for _, k in ipairs(found) do
  if redis.call('EXISTS', ARGV[4] .. k .. '}') == 1 then
    live[#live + 1] = k
  else
    redis.call('ZREM', KEYS[1], k)
  end
end
return {live, #found, found[#found] or ''}
"""

#: Redis refusing a command for now (full, a read-only replica, its primary lost, its disk
#: failing): nothing ran. redis-py raises a class for some and keeps the error code for others.
_REFUSED = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterDownError,  # MASTERDOWN too
    redis.exceptions.TryAgainError,
)
_REFUSALS = ("MISCONF", "NOREPLICAS")
#: What Redis answers a client without the right credentials.
_AUTH_WORDS = (
    "NOAUTH",
    "WRONGPASS",
    "invalid username-password",
    "must be called with the client already authenticated",
)
_KEYS_BATCH = 1000


def _safe_url(url: str) -> str:
    """The URL without its credentials or options, for messages."""
    parts = urlsplit(url)
    where = parts.hostname or ""
    if parts.port:
        where += f":{parts.port}"
    return f"{parts.scheme}://{where}{parts.path}"


def _unblob(data: bytes, decode: Callable[[bytes], Any], what: str, key: str) -> Any:
    try:
        payload, end = unframe(data)
        if end != len(data):
            raise CorruptData(f"{len(data) - end} unexpected bytes after the frame")
        return decode(payload)
    except CorruptData as err:
        raise CorruptData(f"session {key!r}: its {what} in Redis is corrupt: {err}") from None


class RedisStore:
    """See the module docstring. Thread-safe: one redis-py client over a bounded connection pool
    that reconnects by itself once Redis is back."""

    shared = True
    durable = True  # as durable as Redis's AOF settings make it

    def __init__(
        self,
        url: str,
        key_policy: KeyPolicy | None = None,
        namespace: str = "normserve",
        socket_timeout: float = 2.0,
        *,
        max_connections: int = 64,
        cache_entries: int = 100_000,
        cache_bytes: int = 256 << 20,
    ) -> None:
        self.key_policy = key_policy or KeyPolicy()
        self.url = _safe_url(url)
        self._ns = namespace
        self._index = f"{namespace}:index".encode()
        # A command is retried (after reconnecting) twice, briefly: enough to ride over the stale
        # pooled connections a Redis restart leaves, short enough to answer UNAVAILABLE fast.
        # Retrying a write is safe: a script that had run answers as if it ran now (see _CREATE,
        # _COMMIT), and one that had not runs once.
        self._pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.2, base=0.02), 2),
        )
        self._redis = redis.Redis(connection_pool=self._pool)
        self._create = self._redis.register_script(_CREATE)
        self._commit = self._redis.register_script(_COMMIT)
        self._read = self._redis.register_script(_READ)
        self._applied = self._redis.register_script(_APPLIED)
        self._drop = self._redis.register_script(_DROP)
        self._keys = self._redis.register_script(_KEYS)
        # The last state this process saw of each session: where an update starts from without
        # asking Redis (a stale one costs a Conflict carrying the current state, no more).
        self._seen: OrderedDict[str, tuple[SessionState, int]] = OrderedDict()
        self._seen_bytes = 0
        self._cache_entries = cache_entries
        self._cache_bytes = cache_bytes
        self._seen_lock = threading.Lock()

    # ---- the interface (see _base.StateStore)

    def create(self, key: str, record: SessionRecord, state: SessionState) -> Ticket:
        ttl = self._ttl_ms(record)
        blob = frame(encode_state(state))
        with self._reaching():
            taken = self._create(
                keys=[*self._session_keys(key), self._index],
                args=[key, state.version, blob, frame(encode_record(record)), ttl, state.uid],
            )
        if taken != 1:
            current = _unblob(taken[0], decode_state, "state", key)
            self._saw(key, current)
            raise Conflict(key, current)
        self._saw(key, state)
        return None

    def load(self, key: str) -> tuple[SessionRecord, SessionState] | None:
        with self._reaching():
            found = self._redis.hmget(self._s(key), ["rec", "state"])
        rec, blob = cast("list[bytes | None]", found)
        if rec is None or blob is None:
            return None
        state = _unblob(blob, decode_state, "state", key)
        self._saw(key, state)
        return _unblob(rec, decode_record, "record", key), state

    def read(self, key: str, touch: bool = True) -> SessionState:
        with self._reaching():
            if touch:
                blob = self._read(keys=self._session_keys(key))
            else:
                blob = self._redis.hget(self._s(key), "state")
        if blob is None:
            self._forget(key)
            raise KeyError(key)
        state: SessionState = _unblob(blob, decode_state, "state", key)
        self._saw(key, state)
        return state

    def latest(self, key: str) -> SessionState:
        with self._seen_lock:
            seen = self._seen.get(key)
            if seen is not None:
                self._seen.move_to_end(key)
                return seen[0]
        return self.read(key, touch=False)

    def commit(
        self,
        key: str,
        state: SessionState,
        expected_version: int,
        idempotency: Idempotency | None = None,
    ) -> Ticket:
        blob = frame(encode_state(state))
        policy = self.key_policy
        with self._reaching():
            answer = self._commit(
                keys=self._session_keys(key),
                args=[
                    expected_version,
                    state.version,
                    blob,
                    state.uid,
                    idempotency.key if idempotency else "",
                    idempotency.fingerprint if idempotency else "",
                    policy.max_keys,
                    round(policy.window_seconds * 1e6),
                ],
            )
        code = answer[0]
        if code == 3:
            self._saw(key, state)
            return None
        if code == 1:
            raise AlreadyApplied(_parse_applied(answer[1]))
        if code == 2:
            current = _unblob(answer[1], decode_state, "state", key)
            self._saw(key, current)
            raise Conflict(key, current)
        self._forget(key)
        raise Conflict(key, None)

    def applied(self, key: str, idempotency_key: str) -> Applied | None:
        _, i, z = self._session_keys(key)
        window = round(self.key_policy.window_seconds * 1e6)
        with self._reaching():
            seen = self._applied(keys=[i, z], args=[idempotency_key, window])
        return None if seen is None else _parse_applied(seen)

    def drop(self, key: str) -> Ticket:
        self._forget(key)
        with self._reaching():
            self._drop(keys=[*self._session_keys(key), self._index], args=[key])
        self._forget(key)  # again: a concurrent read may have cached it in between
        return None

    def keys(self, prefix: str = "", after: str = "", limit: int = 0) -> list[str]:
        # Lex ranges over the UTF-8 bytes sort as Python sorts str (by code point); no UTF-8
        # string contains the byte 0xFF, so prefix + 0xFF bounds every key that starts with it.
        p = prefix.encode()
        if after and after >= prefix:
            low = b"(" + after.encode()
        else:
            low = b"[" + p if p else b"-"
        high = b"(" + p + b"\xff" if p else b"+"
        found: list[str] = []
        with self._reaching():
            while not limit or len(found) < limit:
                want = _KEYS_BATCH if not limit else min(_KEYS_BATCH, limit - len(found))
                live, examined, last = self._keys(
                    keys=[self._index], args=[low, high, want, f"{self._ns}:s:{{"]
                )
                found.extend(k.decode() for k in live)
                if examined < want:
                    break
                low = b"(" + last
        return found

    def expire_time(self, key: str) -> float | None:
        with self._reaching():
            ms = self._redis.pttl(self._s(key))
        return None if ms < 0 else time.time() + ms / 1000.0

    def rendezvous(self) -> Any:
        """The rendezvous of synchronized sessions through this Redis, so that a group's
        participants may reach any process or replica on it (see ``_redis_groups``)."""
        from normserve.server.service._redis_groups import RedisGroups  # it builds on sessions

        return RedisGroups(self._redis, self._ns, self.url)

    def close(self) -> None:
        self._redis.close()
        self._pool.disconnect()

    # ---- helpers

    def _s(self, key: str) -> str:
        return f"{self._ns}:s:{{{key}}}"

    def _session_keys(self, key: str) -> list[str]:
        return [f"{self._ns}:{kind}:{{{key}}}" for kind in "siz"]

    def ping(self) -> None:
        """Checks that Redis answers: StoreUnavailable where it cannot be reached (it may come
        up later), ValueError for what no retry can fix (credentials, the database number)."""
        try:
            self._redis.ping()
        except (redis.AuthenticationError, redis.ResponseError) as err:
            text = str(err)
            if isinstance(err, redis.AuthenticationError) or any(
                word in text for word in _AUTH_WORDS
            ):
                raise ValueError(
                    f"--store: Redis at {self.url} refused this server's credentials ({text}): "
                    "give the password in the URL (redis://:PASSWORD@HOST:PORT/DB, best through "
                    "NORMSERVE_STORE, since flags show in ps)"
                ) from None
            if "DB index" in text:
                raise ValueError(
                    f"--store: Redis at {self.url}: {text} (the URL's /DB must be below the "
                    "server's 'databases' setting, 16 by default)"
                ) from None
            with self._reaching():
                raise
        except (redis.ConnectionError, redis.TimeoutError):
            with self._reaching():
                raise

    @staticmethod
    def _ttl_ms(record: SessionRecord) -> int:
        return max(1, round(record.ttl_seconds * 1000)) if record.ttl_seconds > 0 else 0

    @contextmanager
    def _reaching(self) -> Iterator[None]:
        """Redis unreachable (down, restarting, loading its AOF) or refusing writes for now:
        StoreUnavailable, naming the server but never its credentials."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise StoreUnavailable(
                f"the session store, Redis at {self.url}, is unreachable ({err}); no change was "
                "half-applied: retry"
            ) from None
        except redis.ResponseError as err:
            if isinstance(err, _REFUSED) or str(err).startswith(_REFUSALS):
                raise StoreUnavailable(
                    f"the session store, Redis at {self.url}, refused the write ({err}); nothing "
                    "was applied: retry"
                ) from None
            raise

    def _saw(self, key: str, state: SessionState) -> None:
        size = sum(
            t.nbytes
            for t in (state.running_mean, state.running_var, state.weight, state.bias)
            if t is not None
        )
        with self._seen_lock:
            old = self._seen.get(key)
            if old is not None:
                # writers in this process may report out of order: keep the newest
                if old[0].uid == state.uid and old[0].version > state.version:
                    return
                self._seen_bytes -= old[1]
            self._seen[key] = (state, size)
            self._seen.move_to_end(key)
            self._seen_bytes += size
            while self._seen and (
                len(self._seen) > self._cache_entries or self._seen_bytes > self._cache_bytes
            ):
                _, (_, dropped) = self._seen.popitem(last=False)
                self._seen_bytes -= dropped

    def _forget(self, key: str) -> None:
        with self._seen_lock:
            old = self._seen.pop(key, None)
            if old is not None:
                self._seen_bytes -= old[1]


def _parse_applied(seen: bytes) -> Applied:
    version, _, fp = seen.decode().partition(" ")
    return Applied(int(version), fp)
