"""The memory store: state in this process (the default). Fast, and gone with the process."""

from __future__ import annotations

import threading
import time

from normserve.server.service._state import SessionState
from normserve.server.service.stores._base import (
    AlreadyApplied,
    Applied,
    Conflict,
    Idempotency,
    KeyPolicy,
    SessionRecord,
    Ticket,
    prune_keys,
)

__all__ = ["MemoryStore"]


class MemoryStore:
    """Records, snapshots and idempotency keys in dicts, changed under one short lock. Subclassed
    by the local durable store, which adds the files."""

    shared = False
    durable = False

    def __init__(self, key_policy: KeyPolicy | None = None) -> None:
        self.key_policy = key_policy or KeyPolicy()
        self._records: dict[str, SessionRecord] = {}
        self._states: dict[str, SessionState] = {}
        self._keys: dict[str, dict[str, tuple[Applied, float]]] = {}
        self._lock = threading.Lock()

    # ---- the interface (see _base.StateStore)

    def create(self, key: str, record: SessionRecord, state: SessionState) -> Ticket:
        with self._lock:
            if key in self._states:
                raise Conflict(key, self._states[key])
            self._records[key] = record
            self._states[key] = state
            self._keys[key] = {}
            return self._created(key, record, state)

    def load(self, key: str) -> tuple[SessionRecord, SessionState] | None:
        with self._lock:
            record, state = self._records.get(key), self._states.get(key)
        return None if record is None or state is None else (record, state)

    def read(self, key: str, touch: bool = True) -> SessionState:
        return self._states[key]  # one dict read: atomic under the GIL

    def latest(self, key: str) -> SessionState:
        return self._states[key]

    def commit(
        self,
        key: str,
        state: SessionState,
        expected_version: int,
        idempotency: Idempotency | None = None,
    ) -> Ticket:
        with self._lock:
            current = self._states.get(key)
            if current is None:
                raise Conflict(key, None)
            keys = self._keys[key]
            if idempotency is not None:
                seen = keys.get(idempotency.key)
                # a key past the window but not yet pruned still counts: remembering longer is
                # the safe side (the Redis store does the same)
                if seen is not None:
                    raise AlreadyApplied(seen[0])
            if current.version != expected_version:
                raise Conflict(key, current)
            self._states[key] = state
            applied = None
            if idempotency is not None:
                now = time.time()
                applied = Applied(state.version, idempotency.fingerprint)
                keys[idempotency.key] = (applied, now)
                oldest = next(iter(keys.values()))[1]
                if (
                    len(keys) > self.key_policy.max_keys
                    or oldest < now - self.key_policy.window_seconds
                ):
                    prune_keys(keys, self.key_policy, now)
            return self._committed(key, state, idempotency.key if idempotency else None, applied)

    def applied(self, key: str, idempotency_key: str) -> Applied | None:
        seen = self._keys.get(key, {}).get(idempotency_key)
        if seen is None or seen[1] < time.time() - self.key_policy.window_seconds:
            return None
        return seen[0]

    def drop(self, key: str) -> Ticket:
        with self._lock:
            found = self._states.pop(key, None) is not None
            self._records.pop(key, None)
            self._keys.pop(key, None)
            return self._dropped(key) if found else None

    def keys(self, prefix: str = "", after: str = "", limit: int = 0) -> list[str]:
        with self._lock:
            found = sorted(k for k in self._states if k.startswith(prefix) and k > after)
        return found[:limit] if limit else found

    def expire_time(self, key: str) -> float | None:
        return None  # the session manager expires idle sessions of this store

    def close(self) -> None:
        pass

    # ---- hooks for a subclass that persists (called under the lock)

    def _created(self, key: str, record: SessionRecord, state: SessionState) -> Ticket:
        return None

    def _committed(
        self, key: str, state: SessionState, idempotency_key: str | None, applied: Applied | None
    ) -> Ticket:
        return None

    def _dropped(self, key: str) -> Ticket:
        return None
