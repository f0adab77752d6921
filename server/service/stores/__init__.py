"""Session stores behind one interface (``StateStore``): memory (the default), local durable files
(``LocalStore``), and Redis (``RedisStore``, shared by every process pointed at it).
``open_store`` builds the one the server's settings name."""

from __future__ import annotations

from normserve.server.service.stores._base import (
    DEFAULT_KEY_WINDOW_SECONDS,
    DEFAULT_MAX_KEYS,
    AlreadyApplied,
    Applied,
    Conflict,
    Idempotency,
    KeyPolicy,
    SessionRecord,
    StateStore,
    StoreUnavailable,
    Ticket,
    fingerprint,
)
from normserve.server.service.stores._codec import CorruptData
from normserve.server.service.stores._memory import MemoryStore

__all__ = [
    "DEFAULT_KEY_WINDOW_SECONDS",
    "DEFAULT_MAX_KEYS",
    "AlreadyApplied",
    "Applied",
    "Conflict",
    "CorruptData",
    "Idempotency",
    "KeyPolicy",
    "MemoryStore",
    "SessionRecord",
    "StateStore",
    "StoreUnavailable",
    "Ticket",
    "fingerprint",
    "open_store",
]


def open_store(
    store: str = "memory",
    state_dir: str = "",
    durability: str = "interval",
    snapshot_interval: float = 5.0,
    key_policy: KeyPolicy | None = None,
) -> StateStore:
    """The store the settings name: ``store`` is "memory" or a redis:// (rediss://, unix://) URL;
    ``state_dir`` (with the memory store) makes it the local durable store. ValueError for a
    combination that cannot work."""
    policy = key_policy or KeyPolicy()
    if store.startswith(("redis://", "rediss://", "unix://")):
        if state_dir:
            raise ValueError(
                "--state-dir and --store redis://... exclude each other: Redis keeps the state"
            )
        from normserve.server.service.stores._redis import RedisStore

        return RedisStore(store, key_policy=policy)
    if store != "memory":
        raise ValueError(f"--store: expected memory or a redis://HOST:PORT/DB URL, got {store!r}")
    if state_dir:
        from normserve.server.service.stores._local import LocalStore

        return LocalStore(state_dir, durability, snapshot_interval, key_policy=policy)
    return MemoryStore(policy)
