"""The call running in this context (request id, tenant, labels), shared by interceptors and
servicer."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from normserve.server.service import DEFAULT_TENANT

__all__ = ["CallInfo", "current_call", "current_request_id", "current_tenant"]


@dataclass
class CallInfo:
    """What the logs and metrics know about the call running in this context. ``tenant`` is ''
    until the call is authenticated (and stays so for health checks and refused callers)."""

    method: str
    request_id: str
    kind: str = ""
    mode: str = ""
    tenant: str = ""


_current: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "normserve_call", default=None
)
#: Set by the auth interceptor once it has identified the caller.
_tenant: contextvars.ContextVar[str] = contextvars.ContextVar(
    "normserve_tenant", default=DEFAULT_TENANT
)


def current_call() -> CallInfo | None:
    return _current.get()


def current_request_id() -> str:
    call = _current.get()
    return call.request_id if call is not None else ""


def current_tenant() -> str:
    """The authenticated caller's tenant; the default tenant on a server without tokens."""
    return _tenant.get()
