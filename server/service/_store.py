"""Where session state is kept: one interface for reading a snapshot and committing the next one
atomically with its version. The session computes; the store keeps.

``MemoryStore`` keeps it in this process (the default). Durable and shared stores implement the
same two operations: ``read`` the current snapshot, ``commit`` a new one only if the version it was
computed from is still current (compare-and-set), so concurrent writers apply each update once.
"""

from __future__ import annotations

import threading
from typing import Protocol

from normserve.server.service._state import SessionState

__all__ = ["Conflict", "MemoryStore", "StateStore"]


class Conflict(Exception):
    """The state changed since it was read: recompute from the new snapshot."""


class StateStore(Protocol):
    def read(self, session_id: str) -> SessionState:
        """The current snapshot (KeyError if the session has none)."""
        ...

    def commit(self, session_id: str, state: SessionState, expected_version: int) -> None:
        """Stores ``state`` if the current version is ``expected_version`` (0: a new session);
        raises Conflict otherwise, changing nothing."""
        ...

    def drop(self, session_id: str) -> None:
        """Forgets the session's state."""
        ...


class MemoryStore:
    """State in this process's memory: a dict of snapshots, committed under one short lock."""

    def __init__(self) -> None:
        self._states: dict[str, SessionState] = {}
        self._lock = threading.Lock()

    def read(self, session_id: str) -> SessionState:
        return self._states[session_id]  # one dict read: atomic under the GIL

    def commit(self, session_id: str, state: SessionState, expected_version: int) -> None:
        with self._lock:
            current = self._states.get(session_id)
            if (current.version if current is not None else 0) != expected_version:
                raise Conflict(session_id)
            self._states[session_id] = state

    def drop(self, session_id: str) -> None:
        with self._lock:
            self._states.pop(session_id, None)
