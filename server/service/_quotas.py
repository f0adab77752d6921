"""Per-tenant quotas: sessions, session memory, open streams, in-flight bytes, requests per second.

Every check happens before what it guards is allocated: a call over a quota raises
``QuotaExceeded`` (a ``ResourceExhausted``) naming the tenant and the server flag that sets the
quota, and nothing of it is kept. What is reserved is given back when the session is deleted, the
stream ends, or the request is done. A limit of 0 means no limit. The default tenant (a server
without tokens) has the same quotas as any other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from normserve.server.service._errors import ResourceExhausted

__all__ = ["DEFAULT_TENANT", "QUOTAS", "QuotaExceeded", "QuotaLimits", "TenantQuotas"]

#: The tenant of every caller of a server without tokens.
DEFAULT_TENANT = "default"

#: Each quota's name (in metrics) and the server flag that sets it.
QUOTAS = {
    "sessions": "--quota-sessions",
    "session_bytes": "--quota-session-bytes",
    "streams": "--quota-streams",
    "inflight_bytes": "--quota-inflight-bytes",
    "rps": "--quota-rps",
}


class QuotaExceeded(ResourceExhausted):
    """A tenant's quota would be exceeded; ``quota`` is its name in ``QUOTAS``."""

    def __init__(self, tenant: str, quota: str, message: str) -> None:
        super().__init__(message)
        self.tenant, self.quota = tenant, quota


@dataclass(frozen=True)
class QuotaLimits:
    """What each tenant may hold at once (0: no limit). The defaults are the server's."""

    sessions: int = 1000
    session_bytes: int = 1 << 30
    streams: int = 256
    inflight_bytes: int = 512 << 20
    rps: float = 10_000.0


class _Usage:
    __slots__ = ("inflight_bytes", "session_bytes", "sessions", "stamp", "streams", "tokens")

    def __init__(self, burst: float, now: float) -> None:
        self.sessions = self.session_bytes = self.streams = self.inflight_bytes = 0
        self.tokens, self.stamp = burst, now  # the bucket starts full


class TenantQuotas:
    """The quotas of every tenant and what each holds now. Thread-safe; every operation is a few
    dictionary and integer operations under one lock.

    ``on_reject(tenant, quota)`` is told of every refusal (the transport counts them).
    """

    def __init__(
        self,
        limits: QuotaLimits | None = None,
        on_reject: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or QuotaLimits()
        # one second's worth of requests, and at least one (a rate below 1/s still admits some)
        self._burst = max(self.limits.rps, 1.0)
        self._on_reject = on_reject
        self._clock = clock
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    def _of(self, tenant: str) -> _Usage:
        u = self._usage.get(tenant)
        if u is None:
            u = self._usage[tenant] = _Usage(self._burst, self._clock())
        return u

    def _refuse(self, tenant: str, quota: str, message: str) -> QuotaExceeded:
        if self._on_reject is not None:
            self._on_reject(tenant, quota)
        return QuotaExceeded(tenant, quota, f"tenant {tenant!r} {message}")

    # ---- requests per second: a token bucket holding one second's worth

    def admit(self, tenant: str) -> None:
        """Takes one request from the tenant's bucket, or raises QuotaExceeded."""
        rate = self.limits.rps
        if not rate:
            return
        with self._lock:
            u = self._of(tenant)
            now = self._clock()
            u.tokens = min(self._burst, u.tokens + (now - u.stamp) * rate)
            u.stamp = now
            if u.tokens >= 1.0:
                u.tokens -= 1.0
                return
        raise self._refuse(
            tenant, "rps", f"is over its --quota-rps of {rate:g} requests per second; retry later"
        )

    # ---- sessions and their memory

    def reserve_session(self, tenant: str, nbytes: int, force: bool = False) -> None:
        """Counts one more session of ``nbytes`` of state, or raises QuotaExceeded (``force``:
        counts it even past the quotas, for a session that exists already)."""
        limits = self.limits
        with self._lock:
            u = self._of(tenant)
            if force:
                u.sessions += 1
                u.session_bytes += nbytes
                return
            if limits.sessions and u.sessions >= limits.sessions:
                count = u.sessions
            elif limits.session_bytes and u.session_bytes + nbytes > limits.session_bytes:
                held = u.session_bytes
                count = -1
            else:
                u.sessions += 1
                u.session_bytes += nbytes
                return
        if count >= 0:
            raise self._refuse(
                tenant,
                "sessions",
                f"is at its --quota-sessions of {limits.sessions} sessions; delete some",
            )
        raise self._refuse(
            tenant,
            "session_bytes",
            f"would exceed its --quota-session-bytes of {limits.session_bytes} bytes: the session "
            f"needs {nbytes} bytes of state and the tenant's sessions hold {held}; "
            "nothing was allocated",
        )

    def release_session(self, tenant: str, nbytes: int) -> None:
        with self._lock:
            u = self._of(tenant)
            u.sessions -= 1
            u.session_bytes -= nbytes

    # ---- open streams

    def open_stream(self, tenant: str) -> None:
        """Counts one more open stream, or raises QuotaExceeded."""
        limit = self.limits.streams
        with self._lock:
            u = self._of(tenant)
            if not limit or u.streams < limit:
                u.streams += 1
                return
        raise self._refuse(
            tenant,
            "streams",
            f"is at its --quota-streams of {limit} open streams; end one before opening another",
        )

    def close_stream(self, tenant: str) -> None:
        with self._lock:
            self._of(tenant).streams -= 1

    # ---- request bytes being decoded or computed

    def acquire_inflight(self, tenant: str, nbytes: int) -> None:
        """Counts ``nbytes`` of a request being processed, or raises QuotaExceeded."""
        limit = self.limits.inflight_bytes
        with self._lock:
            u = self._of(tenant)
            held = u.inflight_bytes
            if not limit or held + nbytes <= limit:
                u.inflight_bytes = held + nbytes
                return
        if nbytes > limit:
            why = (
                f"cannot have a request of {nbytes} bytes in flight: its --quota-inflight-bytes "
                f"is {limit}"
            )
        else:
            why = (
                f"is at its --quota-inflight-bytes of {limit}: {held} bytes of its requests are "
                f"being processed, this one has {nbytes}; retry later"
            )
        raise self._refuse(tenant, "inflight_bytes", why)

    def release_inflight(self, tenant: str, nbytes: int) -> None:
        with self._lock:
            self._of(tenant).inflight_bytes -= nbytes

    # ---- what the metrics show

    def usage(self, tenant: str) -> dict[str, int]:
        """What the tenant holds now, by quota name (rps excluded)."""
        with self._lock:
            u = self._usage.get(tenant)
            if u is None:
                return dict.fromkeys(("sessions", "session_bytes", "streams", "inflight_bytes"), 0)
            return {
                "sessions": u.sessions,
                "session_bytes": u.session_bytes,
                "streams": u.streams,
                "inflight_bytes": u.inflight_bytes,
            }

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``usage`` of every tenant seen so far."""
        with self._lock:
            tenants = list(self._usage)
        return {tenant: self.usage(tenant) for tenant in tenants}
