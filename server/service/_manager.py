"""The session registry: create, look up, list (paginated), delete."""

from __future__ import annotations

import base64
import binascii
import re
import threading
import uuid

import torch

from normserve.server.service._config import DEFAULT_MAX_FEATURES, SessionConfig, resolve_device
from normserve.server.service._errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from normserve.server.service._session import Session
from normserve.server.service._store import MemoryStore, StateStore

__all__ = ["SessionManager"]

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _shown(text: str, limit: int = 64) -> str:
    """Client-supplied text as an error message may echo it: repr'd, and cut to ``limit``."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


class SessionManager:
    """Owns every session of a server. Thread-safe."""

    def __init__(
        self,
        default_device: str = "auto",
        max_sessions: int = 10_000,
        max_features: int = DEFAULT_MAX_FEATURES,
        store: StateStore | None = None,
    ) -> None:
        self.default_device = resolve_device(default_device, _default_device(), "--device")
        self.max_sessions = max_sessions
        self.max_features = max_features
        self.store: StateStore = store or MemoryStore()
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def _check_room(self, session_id: str) -> None:
        if session_id and session_id in self._sessions:
            raise AlreadyExists(f"session {session_id!r} already exists")
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(
                f"this server holds its maximum of {self.max_sessions} sessions (--max-sessions); "
                "delete some"
            )

    def create(
        self,
        config: SessionConfig,
        session_id: str = "",
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> Session:
        """Validates everything, and checks the limits, before allocating anything."""
        if session_id and (session_id in (".", "..") or not _ID.fullmatch(session_id)):
            raise InvalidArgument(
                "session_id",
                f"must be 1-128 characters of [A-Za-z0-9._-], not . or .., got {_shown(session_id)}",
            )
        config.validate(self.max_features)
        device = resolve_device(config.device, self.default_device)
        with self._lock:
            self._check_room(session_id)
        session = Session(session_id or uuid.uuid4().hex, config, device, self.store, weight, bias)
        with self._lock:
            self._check_room(session_id)  # again: another create may have won meanwhile
            session.create()
            self._sessions[session.session_id] = session
        return session

    def get(self, session_id: str) -> Session:
        # A dict read is atomic under the GIL; the lock guards only mutation.
        session = self._sessions.get(session_id)
        if session is None:
            if not session_id:
                raise InvalidArgument("session_id", "must not be empty")
            raise NotFound(f"session {_shown(session_id)} not found")
        return session

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is None:
            raise NotFound(f"session {_shown(session_id)} not found")
        session.close()

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[Session], str]:
        """One page in id order and the token of the next ('' on the last page). Tokens hold the
        last id returned, so pages stay consistent while sessions come and go."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else ""
        with self._lock:
            ids = sorted(k for k in self._sessions if k > after)
            page = [self._sessions[k] for k in ids[:size]]
        token = _encode_token(page[-1].session_id) if len(ids) > size else ""
        return page, token


def _encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(b"v1:" + last_id.encode()).decode()


def _decode_token(token: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token.encode())
    except (binascii.Error, ValueError):
        raw = b""
    if not raw.startswith(b"v1:"):
        raise InvalidArgument("page_token", "not a token this server issued")
    return raw[3:].decode(errors="replace")
