"""normserve's Python client: sync and asyncio clients, remote BatchNorm modules, the CLI.

>>> from normserve.client import Client
>>> with Client("127.0.0.1:50051") as client:
...     session = client.create_session(64)
...     y = client.normalize(session.session_id, torch.randn(32, 64, 8, 8)).output
"""

from __future__ import annotations

from normserve.client._aio import AsyncClient
from normserve.client._common import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_TARGET,
    NormalizeResult,
    SessionInfo,
)
from normserve.client._errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NormserveError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from normserve.client._modules import RemoteBatchNorm1d, RemoteBatchNorm2d, RemoteBatchNorm3d
from normserve.client._sync import Client

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_TARGET",
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
    "ResourceExhaustedError",
    "SessionInfo",
    "UnavailableError",
]
