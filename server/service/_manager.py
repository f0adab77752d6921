"""The session registry: create, look up, list (paginated), delete; one namespace per tenant.

A ``SessionManager`` is one tenant's view of a registry that all tenants share (the server-wide
session limit, the store, the quotas): ``for_tenant`` gives another tenant's view. A tenant sees
only its own sessions; another tenant's session id is simply not found, and the same id may name
one session in each of two tenants. The default tenant's view is the one constructed.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import os
import re
import threading
import uuid
from dataclasses import dataclass, field

import torch

from normserve.server.service._config import DEFAULT_MAX_FEATURES, SessionConfig, resolve_device
from normserve.server.service._errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from normserve.server.service._quotas import DEFAULT_TENANT, TenantQuotas
from normserve.server.service._session import Session
from normserve.server.service._state import SessionState
from normserve.server.service._store import MemoryStore, StateStore
from normserve.server.service.kinds import for_config

__all__ = ["SessionManager", "check_session_id", "shown", "state_bytes"]

_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
ID_RULE = "must be 1-128 characters of [A-Za-z0-9._-], not . or .."
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = b"v2:"
_MAC_BYTES = 16


def _default_device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def shown(text: str, limit: int = 64) -> str:
    """Client-supplied text as an error message or a log line may echo it: repr'd (control
    characters escaped), and cut to ``limit`` characters with the full length said."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def check_session_id(session_id: str) -> None:
    """Raises InvalidArgument unless ``session_id`` is a well-formed id (echoing at most a short,
    escaped prefix of it)."""
    if not session_id:
        raise InvalidArgument("session_id", "must not be empty")
    if session_id in (".", "..") or not _ID.fullmatch(session_id):
        raise InvalidArgument("session_id", f"{ID_RULE}, got {shown(session_id)}")


def state_bytes(config: SessionConfig) -> int:
    """Bytes of state a session of ``config`` keeps, known before anything is allocated: every
    kept tensor is float32 of [num_features], the batch count an int64."""
    keys = for_config(config).state_keys()
    return sum(8 if key == "num_batches_tracked" else 4 * config.num_features for key in keys)


class _TenantStore:
    """A tenant's keys in the shared store: ``tenant/id`` (ids cannot hold '/', so no tenant's
    key is another's, and the default tenant's keys stay the bare ids)."""

    def __init__(self, store: StateStore, tenant: str) -> None:
        self._store, self._prefix = store, tenant + "/"

    def read(self, session_id: str) -> SessionState:
        return self._store.read(self._prefix + session_id)

    def commit(self, session_id: str, state: SessionState, expected_version: int) -> None:
        self._store.commit(self._prefix + session_id, state, expected_version)

    def drop(self, session_id: str) -> None:
        self._store.drop(self._prefix + session_id)


@dataclass
class _Registry:
    """What every tenant's view shares."""

    default_device: torch.device
    max_sessions: int
    max_features: int
    store: StateStore
    quotas: TenantQuotas
    lock: threading.Lock = field(default_factory=threading.Lock)
    tenants: dict[str, dict[str, Session]] = field(default_factory=dict)
    count: int = 0  # sessions of all tenants
    pending: int = 0  # sessions being created
    secret: bytes = field(default_factory=lambda: os.urandom(32))  # signs page tokens


class SessionManager:
    """One tenant's sessions, in a registry shared with every other tenant. Thread-safe."""

    def __init__(
        self,
        default_device: str = "auto",
        max_sessions: int = 10_000,
        max_features: int = DEFAULT_MAX_FEATURES,
        store: StateStore | None = None,
        quotas: TenantQuotas | None = None,
    ) -> None:
        self._r = _Registry(
            resolve_device(default_device, _default_device(), "--device"),
            max_sessions,
            max_features,
            store or MemoryStore(),
            quotas or TenantQuotas(),
        )
        self._bind(DEFAULT_TENANT)

    def _bind(self, tenant: str) -> None:
        self.tenant = tenant
        self._store: StateStore = (
            self._r.store if tenant == DEFAULT_TENANT else _TenantStore(self._r.store, tenant)
        )
        with self._r.lock:
            self._sessions = self._r.tenants.setdefault(tenant, {})

    def for_tenant(self, tenant: str) -> SessionManager:
        """The same registry as ``tenant`` sees it."""
        view = copy.copy(self)
        view._bind(tenant)
        return view

    @property
    def default_device(self) -> torch.device:
        return self._r.default_device

    @property
    def max_sessions(self) -> int:
        return self._r.max_sessions

    @property
    def max_features(self) -> int:
        return self._r.max_features

    @property
    def store(self) -> StateStore:
        return self._r.store

    @property
    def quotas(self) -> TenantQuotas:
        return self._r.quotas

    def __len__(self) -> int:
        """Sessions of every tenant (the server's count)."""
        return self._r.count

    def _check_room(self, session_id: str) -> None:
        if session_id and session_id in self._sessions:
            raise AlreadyExists(f"session {session_id!r} already exists")
        if self._r.count + self._r.pending >= self._r.max_sessions:
            raise ResourceExhausted(
                f"this server holds its maximum of {self._r.max_sessions} sessions "
                "(--max-sessions); delete some"
            )

    def create(
        self,
        config: SessionConfig,
        session_id: str = "",
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> Session:
        """Validates everything, and checks the limits and the tenant's quotas (its memory
        counted from the config), before allocating anything."""
        if session_id:
            check_session_id(session_id)
        config.validate(self.max_features)
        device = resolve_device(config.device, self.default_device)
        nbytes = state_bytes(config)
        r = self._r
        with r.lock:
            self._check_room(session_id)
            r.quotas.reserve_session(self.tenant, nbytes)
            r.pending += 1  # a place held while the state is allocated, outside the lock
        pending, added = True, False
        try:
            session = Session(
                session_id or uuid.uuid4().hex, config, device, self._store, weight, bias
            )
            with r.lock:
                r.pending -= 1
                pending = False
                self._check_room(session_id)  # again: another create may have won meanwhile
                session.create()
                self._sessions[session.session_id] = session
                r.count += 1
                added = True
        finally:
            if not added:
                if pending:
                    with r.lock:
                        r.pending -= 1
                r.quotas.release_session(self.tenant, nbytes)
        return session

    def get(self, session_id: str) -> Session:
        # A dict read is atomic under the GIL; the lock guards only mutation. A session found is
        # well-formed by construction: only a miss needs the id checked.
        session = self._sessions.get(session_id)
        if session is None:
            check_session_id(session_id)
            raise NotFound(f"session {shown(session_id)} not found")
        return session

    def delete(self, session_id: str) -> None:
        r = self._r
        with r.lock:
            session = self._sessions.pop(session_id, None)
            if session is not None:
                r.count -= 1
        if session is None:
            check_session_id(session_id)
            raise NotFound(f"session {shown(session_id)} not found")
        r.quotas.release_session(self.tenant, state_bytes(session.config))
        session.close()

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[Session], str]:
        """One page of this tenant's sessions in id order and the token of the next ('' on the
        last page). A token holds the last id returned, so pages stay consistent while sessions
        come and go, and is signed for this tenant: another tenant's token is refused."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = self._decode_token(page_token) if page_token else ""
        with self._r.lock:
            ids = sorted(k for k in self._sessions if k > after)
            page = [self._sessions[k] for k in ids[:size]]
        token = self._encode_token(page[-1].session_id) if len(ids) > size else ""
        return page, token

    def _mac(self, last_id: bytes) -> bytes:
        message = self.tenant.encode() + b"\0" + last_id
        return hmac.digest(self._r.secret, message, hashlib.sha256)[:_MAC_BYTES]

    def _encode_token(self, last_id: str) -> str:
        raw = last_id.encode()
        return base64.urlsafe_b64encode(_TOKEN_PREFIX + self._mac(raw) + raw).decode()

    def _decode_token(self, token: str) -> str:
        try:
            raw = base64.urlsafe_b64decode(token.encode())
        except (binascii.Error, ValueError):
            raw = b""
        head = len(_TOKEN_PREFIX) + _MAC_BYTES
        last_id, mac = raw[head:], raw[len(_TOKEN_PREFIX) : head]
        if not (
            raw.startswith(_TOKEN_PREFIX)
            and len(raw) > head
            and hmac.compare_digest(mac, self._mac(last_id))
        ):
            raise InvalidArgument("page_token", "not a token this server issued")
        return last_id.decode(errors="replace")
