"""The session registry: create, look up, list (paginated), delete, expire; one namespace per
tenant.

A ``SessionManager`` is one tenant's view of a registry that all tenants share (the server-wide
session limit, the store, the quotas): ``for_tenant`` gives another tenant's view. A tenant sees
only its own sessions; another tenant's session id is simply not found, and the same id may name
one session in each of two tenants. The default tenant's view is the one constructed.

The store holds the sessions (``stores``: key ``tenant/id``); the manager holds this process's
``Session`` objects for them, made on first use from the store's record, so a session created by
another process sharing the store, or before a restart, is served like one created here. A
durable store that only this process uses is read whole at start (so limits and quotas count
its sessions); a shared one is read session by session as calls name them.

Idle sessions expire (``expire_idle``, called periodically by the server): each session's TTL
comes from its config, or the server's default. Stores that keep the TTL themselves (Redis)
delete the session; here it is only forgotten. Otherwise it is deleted here.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from normserve.server.service._config import DEFAULT_MAX_FEATURES, SessionConfig, resolve_device
from normserve.server.service._errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from normserve.server.service._quotas import DEFAULT_TENANT, TenantQuotas
from normserve.server.service._session import Session
from normserve.server.service.kinds import for_config
from normserve.server.service.stores import Conflict, MemoryStore, StateStore, Ticket

__all__ = ["MAX_TTL_SECONDS", "SessionManager", "check_session_id", "shown", "state_bytes"]

log = logging.getLogger("normserve.sessions")

#: The longest idle TTL a session may ask for (ten years).
MAX_TTL_SECONDS = 10 * 365 * 86400.0

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
    kept tensor is float32 of the shape its kind keeps it in, the batch count an int64."""
    return for_config(config).state_bytes()


@dataclass
class _Registry:
    """What every tenant's view shares."""

    default_device: torch.device
    max_sessions: int
    max_features: int
    store: StateStore
    quotas: TenantQuotas
    default_ttl: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    tenants: dict[str, dict[str, Session]] = field(default_factory=dict)
    count: int = 0  # sessions of all tenants held here
    pending: int = 0  # sessions being created
    expired: int = 0  # sessions expired (or, with a store that expires them, forgotten) here
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
        default_ttl: float = 0.0,
    ) -> None:
        """``default_ttl``: idle seconds before a session whose config sets none expires (0:
        never)."""
        self._r = _Registry(
            resolve_device(default_device, _default_device(), "--device"),
            max_sessions,
            max_features,
            store or MemoryStore(),
            quotas or TenantQuotas(),
            default_ttl,
        )
        self._bind(DEFAULT_TENANT)
        if self.store.durable and not self.store.shared:
            self._load_all()

    def _bind(self, tenant: str) -> None:
        self.tenant = tenant
        self._prefix = tenant + "/"
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

    @property
    def default_ttl(self) -> float:
        return self._r.default_ttl

    @property
    def expired(self) -> int:
        """Sessions expired here since the start."""
        return self._r.expired

    def __len__(self) -> int:
        """Sessions of every tenant this process holds (all of them, but with a shared store)."""
        return self._r.count

    def _key(self, session_id: str) -> str:
        return self._prefix + session_id

    def _ttl(self, config: SessionConfig) -> float:
        ttl = config.ttl_seconds
        if ttl is None:
            return self._r.default_ttl
        if not (math.isfinite(ttl) and 0 <= ttl <= MAX_TTL_SECONDS):
            raise InvalidArgument(
                "config.ttl_seconds",
                f"must be between 0 (never expires) and {MAX_TTL_SECONDS:.0f}, got {ttl}",
            )
        return ttl

    def _load_all(self) -> None:
        """Every session of a durable store only this process uses, as if created here."""
        loaded = 0
        for key in self.store.keys():  # noqa: SIM118 (a store, not a dict)
            tenant, _, session_id = key.partition("/")
            view = self if tenant == self.tenant else self.for_tenant(tenant)
            try:
                view._load(session_id, force=True)
                loaded += 1
            except (ServiceError, ValueError) as err:
                log.error("session %r from the store cannot be served here: %s", key, err)
        if loaded:
            log.info("%d session(s) loaded from the store", loaded)

    def _load(self, session_id: str, force: bool = False) -> Session | None:
        """The session the store has under ``session_id``, now held here; None if none.
        ``force``: counted even past the limits (sessions that exist already)."""
        found = self.store.load(self._key(session_id))
        if found is None:
            return None
        record, _ = found
        try:
            device = resolve_device(record.config.device, self.default_device)
        except ServiceError as err:
            raise ServiceError(f"session {session_id!r}: {err}") from None
        session = Session(
            session_id, record.config, device, self.store, key=self._key(session_id), record=record
        )
        nbytes = state_bytes(record.config)
        r = self._r
        with r.lock:
            held = self._sessions.get(session_id)
            if held is not None and held.record.uid == record.uid:
                return held
            if not force:
                self._check_room("")
            r.quotas.reserve_session(self.tenant, nbytes, force=force)
            if held is not None:  # a session re-created elsewhere under this id replaces it
                self._sessions.pop(session_id)
                r.count -= 1
                r.quotas.release_session(self.tenant, state_bytes(held.config))
            session.on_gone = self._forget
            self._sessions[session_id] = session
            r.count += 1
        return session

    def _forget(self, session: Session) -> bool:
        """Stops holding ``session`` (the store no longer has it); whether it was held."""
        r = self._r
        with r.lock:
            if self._sessions.get(session.session_id) is not session:
                return False
            del self._sessions[session.session_id]
            r.count -= 1
        r.quotas.release_session(self.tenant, state_bytes(session.config))
        return True

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
        ttl = self._ttl(config)
        device = resolve_device(config.device, self.default_device)
        nbytes = state_bytes(config)
        r = self._r
        with r.lock:
            self._check_room(session_id)
            r.quotas.reserve_session(self.tenant, nbytes)
            r.pending += 1  # a place held while the state is allocated, outside the lock
        pending, added = True, False
        try:
            sid = session_id or uuid.uuid4().hex
            session = Session(
                sid, config, device, self.store, weight, bias, key=self._key(sid), ttl_seconds=ttl
            )
            with r.lock:
                r.pending -= 1
                pending = False
                self._check_room(session_id)  # again: another create may have won meanwhile
                try:
                    session.created = session.create()
                except Conflict:
                    raise AlreadyExists(
                        f"session {session_id!r} already exists (created by another process "
                        "sharing the store)"
                    ) from None
                session.on_gone = self._forget
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
            if self.store.shared:
                session = self._load(session_id)
            if session is None:
                raise NotFound(f"session {shown(session_id)} not found")
        return session

    def delete(self, session_id: str) -> Ticket:
        """Deletes the session (in the store: for every process sharing it); the ticket of the
        store's change."""
        session = self.get(session_id)
        self._forget(session)
        return session.close()

    def expire_idle(self, now: float | None = None) -> int:
        """Expires the sessions of every tenant idle past their TTL; returns how many."""
        now = time.time() if now is None else now
        r = self._r
        with r.lock:
            idle = [
                (tenant, s)
                for tenant, sessions in r.tenants.items()
                for s in sessions.values()
                if s.ttl_seconds and s.last_used + s.ttl_seconds <= now
            ]
        expired = 0
        for tenant, session in idle:
            view = self if tenant == self.tenant else self.for_tenant(tenant)
            if not view._forget(session):
                continue
            if self.store.shared:
                # Redis expires it itself, unless another process uses it: this process only
                # stops holding it (counted nowhere: a sum over processes would count it twice)
                continue
            session.close()
            expired += 1
            log.info(
                "session %s of tenant %s expired after %.0f s idle",
                shown(session.session_id),
                tenant,
                now - session.last_used,
            )
        r.expired += expired
        return expired

    def list(self, page_size: int = 0, page_token: str = "") -> tuple[list[Session], str]:
        """One page of this tenant's sessions in id order and the token of the next ('' on the
        last page). A token holds the last id returned, so pages stay consistent while sessions
        come and go, and is signed for this tenant: another tenant's token is refused."""
        if page_size < 0:
            raise InvalidArgument("page_size", f"must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = self._decode_token(page_token) if page_token else ""
        if not self.store.shared:
            with self._r.lock:
                ids = sorted(k for k in self._sessions if k > after)
                page = [self._sessions[k] for k in ids[:size]]
            more = len(ids) > size
        else:
            keys = self.store.keys(self._prefix, self._key(after) if after else "", size + 1)
            more = len(keys) > size
            page = []
            for key in keys[:size]:
                sid = key[len(self._prefix) :]
                session = self._sessions.get(sid) or self._load(sid)
                if session is not None:
                    page.append(session)
        token = self._encode_token(page[-1].session_id) if more and page else ""
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
