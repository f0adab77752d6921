"""normserve's Python client: sync and asyncio clients, remote normalization modules, the CLI.

>>> from normserve.client import Client
>>> with Client("127.0.0.1:50051") as client:
...     session = client.create_session(64)
...     y = client.normalize(session.session_id, torch.randn(32, 64, 8, 8)).output
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from normserve.client._aio import AsyncClient
from normserve.client._common import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_TARGET,
    NormalizeResult,
    RenormLimits,
    RetryPolicy,
    SessionInfo,
)
from normserve.client._errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NormserveError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from normserve.client._sync import Client

if TYPE_CHECKING:
    from normserve.client._batch_modules import (
        RemoteBatchRenorm1d,
        RemoteBatchRenorm2d,
        RemoteBatchRenorm3d,
        RemoteGhostBatchNorm1d,
        RemoteGhostBatchNorm2d,
        RemoteGhostBatchNorm3d,
        RemoteRecurrentBatchNorm1d,
    )
    from normserve.client._calibration import recalibrate
    from normserve.client._modules import (
        RemoteBatchNorm1d,
        RemoteBatchNorm2d,
        RemoteBatchNorm3d,
        RemoteNorm,
    )
    from normserve.client._norm_modules import (
        RemoteGroupNorm,
        RemoteInstanceNorm1d,
        RemoteInstanceNorm2d,
        RemoteInstanceNorm3d,
        RemoteLayerNorm,
        RemoteRMSNorm,
    )
    from normserve.client._sync_modules import (
        RemoteSyncBatchNorm1d,
        RemoteSyncBatchNorm2d,
        RemoteSyncBatchNorm3d,
    )

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_TARGET",
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "Client",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NormalizeResult",
    "NormserveError",
    "NotFoundError",
    "RemoteBatchNorm1d",
    "RemoteBatchNorm2d",
    "RemoteBatchNorm3d",
    "RemoteBatchRenorm1d",
    "RemoteBatchRenorm2d",
    "RemoteBatchRenorm3d",
    "RemoteGhostBatchNorm1d",
    "RemoteGhostBatchNorm2d",
    "RemoteGhostBatchNorm3d",
    "RemoteGroupNorm",
    "RemoteInstanceNorm1d",
    "RemoteInstanceNorm2d",
    "RemoteInstanceNorm3d",
    "RemoteLayerNorm",
    "RemoteNorm",
    "RemoteRMSNorm",
    "RemoteRecurrentBatchNorm1d",
    "RemoteSyncBatchNorm1d",
    "RemoteSyncBatchNorm2d",
    "RemoteSyncBatchNorm3d",
    "RenormLimits",
    "ResourceExhaustedError",
    "RetryPolicy",
    "SessionInfo",
    "UnavailableError",
    "recalibrate",
]

_MODULES = ("RemoteBatchNorm1d", "RemoteBatchNorm2d", "RemoteBatchNorm3d", "RemoteNorm")
_NORM_MODULES = (
    "RemoteGroupNorm",
    "RemoteInstanceNorm1d",
    "RemoteInstanceNorm2d",
    "RemoteInstanceNorm3d",
    "RemoteLayerNorm",
    "RemoteRMSNorm",
)
_SYNC_MODULES = ("RemoteSyncBatchNorm1d", "RemoteSyncBatchNorm2d", "RemoteSyncBatchNorm3d")

_BATCH_MODULES = (
    "RemoteBatchRenorm1d",
    "RemoteBatchRenorm2d",
    "RemoteBatchRenorm3d",
    "RemoteGhostBatchNorm1d",
    "RemoteGhostBatchNorm2d",
    "RemoteGhostBatchNorm3d",
    "RemoteRecurrentBatchNorm1d",
)


def __getattr__(name: str) -> Any:
    # The torch modules load torch: only when asked for, so the clients and the operator commands
    # start without it.
    if name == "recalibrate":
        from normserve.client import _calibration

        return _calibration.recalibrate
    if name in _MODULES:
        from normserve.client import _modules

        return getattr(_modules, name)
    if name in _BATCH_MODULES:
        from normserve.client import _batch_modules

        return getattr(_batch_modules, name)
    if name in _NORM_MODULES:
        from normserve.client import _norm_modules

        return getattr(_norm_modules, name)
    if name in _SYNC_MODULES:
        from normserve.client import _sync_modules

        return getattr(_sync_modules, name)
    raise AttributeError(f"module 'normserve.client' has no attribute {name!r}")
