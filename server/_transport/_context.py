"""The call running in this context (request id, labels), shared by interceptors and servicer."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

__all__ = ["CallInfo", "current_call", "current_request_id"]


@dataclass
class CallInfo:
    """What the logs and metrics know about the call running in this context."""

    method: str
    request_id: str
    kind: str = ""
    mode: str = ""


_current: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar(
    "normserve_call", default=None
)


def current_call() -> CallInfo | None:
    return _current.get()


def current_request_id() -> str:
    call = _current.get()
    return call.request_id if call is not None else ""
