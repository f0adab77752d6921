"""Where session state is kept: one interface, three stores (memory, local files, Redis).

The session computes; the store keeps. A store holds, per session key (``tenant/id``, or the bare
id for the default tenant):

- the session's **record**: what another process needs to serve it (config, creation time, a
  unique id that tells a re-created session from the one it replaced, its idle TTL);
- its **state**: the latest ``SessionState`` snapshot, replaced only by a compare-and-set on the
  version it was computed from (``commit``), so concurrent writers, in one process or many, apply
  each update once, in one order;
- its **applied idempotency keys**: a bounded, expiring memory of which update each key produced,
  committed atomically with the state it belongs to, so a retried request is answered, not
  applied again.

Durability is the store's business: ``commit`` returns a ``Ticket`` (None when the change is
already as durable as the store makes it, or a future that completes once it is, as the strict
local store's group commit does); a caller acknowledges the change only after the ticket.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from normserve.server.service._config import SessionConfig
from normserve.server.service._errors import Unavailable
from normserve.server.service._state import SessionState

__all__ = [
    "DEFAULT_KEY_WINDOW_SECONDS",
    "DEFAULT_MAX_KEYS",
    "AlreadyApplied",
    "Applied",
    "Conflict",
    "Idempotency",
    "KeyPolicy",
    "SessionRecord",
    "StateStore",
    "StoreUnavailable",
    "Ticket",
    "fingerprint",
    "prune_keys",
]

#: Idempotency keys a session remembers, and for how long.
DEFAULT_MAX_KEYS = 1000
DEFAULT_KEY_WINDOW_SECONDS = 3600.0

#: Completes once a change is durable; None: it already is (as durable as the store makes it).
Ticket: TypeAlias = "concurrent.futures.Future[None] | None"


class Conflict(Exception):
    """The version changed since the state was read: recompute from ``current`` (the state now,
    when the store has it at hand; None when the session is gone)."""

    def __init__(self, key: str, current: SessionState | None = None) -> None:
        super().__init__(key)
        self.current = current


@dataclass(frozen=True)
class Applied:
    """What an idempotency key's update produced: the version after it, and the fingerprint of
    the request (a key reused for a different request is refused, not answered)."""

    version: int
    fingerprint: str


class AlreadyApplied(Exception):
    """The idempotency key was applied before: nothing was changed now."""

    def __init__(self, applied: Applied) -> None:
        super().__init__(applied.version)
        self.applied = applied


class StoreUnavailable(Unavailable):
    """The store cannot be reached (Redis down); nothing was changed. Safe to retry."""


@dataclass(frozen=True)
class KeyPolicy:
    """How many idempotency keys a session remembers (the oldest forgotten first), and for how
    many seconds at most."""

    max_keys: int = DEFAULT_MAX_KEYS
    window_seconds: float = DEFAULT_KEY_WINDOW_SECONDS


@dataclass(frozen=True)
class SessionRecord:
    """What any process needs to serve a session it did not create."""

    config: SessionConfig
    create_time: float
    #: unique per creation: a session deleted and created again under its id is another session
    uid: str
    #: idle seconds before the session expires (0: never)
    ttl_seconds: float = 0.0


@dataclass(frozen=True)
class Idempotency:
    """An update's idempotency key and the fingerprint of its request."""

    key: str
    fingerprint: str


class StateStore(Protocol):
    """See the module docstring. Every method is thread-safe. A store that cannot be reached
    raises StoreUnavailable, having changed nothing."""

    #: other processes may change the state: reads must ask the store, not a cache
    shared: bool
    #: the state outlives this process
    durable: bool

    def create(self, key: str, record: SessionRecord, state: SessionState) -> Ticket:
        """Stores a new session; raises Conflict if the key is taken."""
        ...

    def load(self, key: str) -> tuple[SessionRecord, SessionState] | None:
        """A session's record and state, or None."""
        ...

    def read(self, key: str, touch: bool = True) -> SessionState:
        """The current state (KeyError if there is no session). ``touch``: the read is a use of
        the session (restarts its idle TTL where the store keeps it)."""
        ...

    def latest(self, key: str) -> SessionState:
        """The state as an update should start from it: the current one, or the last one this
        process saw where asking would cost a round trip (``commit`` then raises Conflict with
        the current state if it was stale). KeyError if there is no session."""
        ...

    def commit(
        self,
        key: str,
        state: SessionState,
        expected_version: int,
        idempotency: Idempotency | None = None,
    ) -> Ticket:
        """Stores ``state`` if the current version is ``expected_version``, remembering the
        idempotency key (if any) as applied at ``state.version``, atomically. Raises, changing
        nothing: AlreadyApplied if the key was applied before (checked first), Conflict if the
        version moved on or the session is gone."""
        ...

    def applied(self, key: str, idempotency_key: str) -> Applied | None:
        """The update an idempotency key produced, if it is still remembered."""
        ...

    def drop(self, key: str) -> Ticket:
        """Forgets the session: record, state and keys."""
        ...

    def keys(self, prefix: str = "", after: str = "", limit: int = 0) -> list[str]:
        """Session keys starting with ``prefix`` and sorting after ``after``, sorted, at most
        ``limit`` (0: all)."""
        ...

    def expire_time(self, key: str) -> float | None:
        """When the session will expire if not used (Unix seconds), where the store keeps the
        TTL itself (Redis); None where it does not or the session never expires."""
        ...

    def close(self) -> None:
        """Makes everything committed durable (a last snapshot) and releases the store."""
        ...


def prune_keys(
    keys: dict[str, tuple[Applied, float]], policy: KeyPolicy, now: float | None = None
) -> None:
    """Drops, in place, keys older than the policy's window and the oldest beyond its count
    (``keys`` is in insertion order: oldest first, as dicts keep it)."""
    now = time.time() if now is None else now
    horizon = now - policy.window_seconds
    excess = len(keys) - policy.max_keys
    for k in list(keys):
        if excess <= 0 and keys[k][1] >= horizon:
            break
        del keys[k]
        excess -= 1


def fingerprint(mode: str, dtype: str, shape: Iterable[int], statistics_only: bool) -> str:
    """What identifies a request for an idempotency key: a key sent again with another request
    (another shape, dtype or mode) is a client bug, refused rather than answered."""
    return f"{mode}:{dtype}:{'x'.join(str(d) for d in shape)}:{int(statistics_only)}"
