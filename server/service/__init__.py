"""Sessions and their lifecycle: the domain layer, with no gRPC in it.

It could sit behind any transport: it takes and returns plain Python values and torch tensors, and
raises the ``ServiceError`` hierarchy (see ``_errors``).
"""

from __future__ import annotations

from normserve.server.service._config import Kind, Mode, SessionConfig, resolve_device
from normserve.server.service._errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from normserve.server.service._manager import SessionManager
from normserve.server.service._session import (
    ChunkedBatch,
    NormalizeResult,
    Session,
    SessionState,
)

__all__ = [
    "AlreadyExists",
    "ChunkedBatch",
    "FailedPrecondition",
    "InvalidArgument",
    "Kind",
    "Mode",
    "NormalizeResult",
    "NotFound",
    "ResourceExhausted",
    "ServiceError",
    "Session",
    "SessionConfig",
    "SessionManager",
    "SessionState",
    "resolve_device",
]
