"""Sessions and their lifecycle: the domain layer, with no gRPC in it.

It could sit behind any transport: ``NormalizerService`` (the facade) takes and returns plain
Python values and torch tensors, and raises the ``ServiceError`` hierarchy (see ``_errors``).
Layout: ``kinds`` (each normalization's math behind one interface), ``_session`` (ordering and
commits, kind-agnostic), ``_store`` (where state is kept), ``_chunked`` and ``_stream`` (batches
that arrive in chunks), ``_manager`` (the registry), ``_facade`` (what a transport calls).
"""

from __future__ import annotations

from normserve.server.service._chunked import ChunkedBatch
from normserve.server.service._config import (
    ANSWER_OVERHEAD_BYTES,
    DEFAULT_MAX_FEATURES,
    Kind,
    Mode,
    SessionConfig,
    max_features_for,
    resolve_device,
)
from normserve.server.service._errors import (
    AlreadyExists,
    FailedPrecondition,
    IdleTimeout,
    IncompleteStream,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
)
from normserve.server.service._facade import (
    Chunk,
    NormalizeCall,
    NormalizerService,
    StageObserver,
    StreamEncoder,
)
from normserve.server.service._manager import SessionManager
from normserve.server.service._session import NormalizeResult, Session
from normserve.server.service._state import MAX_BATCHES_TRACKED, SessionState
from normserve.server.service._store import Conflict, MemoryStore, StateStore

__all__ = [
    "ANSWER_OVERHEAD_BYTES",
    "DEFAULT_MAX_FEATURES",
    "MAX_BATCHES_TRACKED",
    "AlreadyExists",
    "Chunk",
    "ChunkedBatch",
    "Conflict",
    "FailedPrecondition",
    "IdleTimeout",
    "IncompleteStream",
    "InvalidArgument",
    "Kind",
    "MemoryStore",
    "Mode",
    "NormalizeCall",
    "NormalizeResult",
    "NormalizerService",
    "NotFound",
    "ResourceExhausted",
    "ServiceError",
    "Session",
    "SessionConfig",
    "SessionManager",
    "SessionState",
    "StageObserver",
    "StateStore",
    "StreamEncoder",
    "max_features_for",
    "resolve_device",
]
