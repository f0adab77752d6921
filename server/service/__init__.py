"""Sessions and their lifecycle: the domain layer, with no gRPC in it.

It could sit behind any transport: ``NormalizerService`` (the facade) takes and returns plain
Python values and torch tensors, and raises the ``ServiceError`` hierarchy (see ``_errors``).
Layout: ``kinds`` (each normalization's math behind one interface), ``_session`` (ordering and
commits, kind-agnostic), ``stores`` (where state is kept: memory, local files, Redis), ``_chunked`` and ``_stream`` (batches
that arrive in chunks), ``_manager`` (the registry, a namespace per tenant), ``_quotas`` (what each tenant may hold),
``_facade`` (what a transport calls).
"""

from __future__ import annotations

from normserve.server.service._calibration import Adaptation
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
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    IdleTimeout,
    IncompleteStream,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from normserve.server.service._facade import (
    Chunk,
    NormalizeCall,
    NormalizerService,
    SessionView,
    StageObserver,
    StreamEncoder,
    SyncReduced,
    SyncStep,
)
from normserve.server.service._manager import (
    SessionManager,
    check_session_id,
    shown,
    state_bytes,
)
from normserve.server.service._quotas import (
    DEFAULT_TENANT,
    QUOTAS,
    QuotaExceeded,
    QuotaLimits,
    TenantQuotas,
)
from normserve.server.service._session import NormalizeResult, Session
from normserve.server.service._state import MAX_BATCHES_TRACKED, SessionState
from normserve.server.service._stream import StreamBuffers
from normserve.server.service.stores import (
    Conflict,
    KeyPolicy,
    MemoryStore,
    StateStore,
    StoreUnavailable,
    open_store,
)

__all__ = [
    "ANSWER_OVERHEAD_BYTES",
    "DEFAULT_MAX_FEATURES",
    "DEFAULT_TENANT",
    "MAX_BATCHES_TRACKED",
    "QUOTAS",
    "Aborted",
    "Adaptation",
    "AlreadyExists",
    "Chunk",
    "ChunkedBatch",
    "Conflict",
    "FailedPrecondition",
    "IdleTimeout",
    "IncompleteStream",
    "InvalidArgument",
    "KeyPolicy",
    "Kind",
    "MemoryStore",
    "Mode",
    "NormalizeCall",
    "NormalizeResult",
    "NormalizerService",
    "NotFound",
    "QuotaExceeded",
    "QuotaLimits",
    "ResourceExhausted",
    "ServiceError",
    "Session",
    "SessionConfig",
    "SessionManager",
    "SessionState",
    "SessionView",
    "StageObserver",
    "StateStore",
    "StoreUnavailable",
    "StreamBuffers",
    "StreamEncoder",
    "SyncReduced",
    "SyncStep",
    "TenantQuotas",
    "Unauthenticated",
    "Unavailable",
    "check_session_id",
    "max_features_for",
    "open_store",
    "resolve_device",
    "shown",
    "state_bytes",
]
