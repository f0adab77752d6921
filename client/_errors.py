"""The client's errors: every failed call raises a ``NormserveError`` carrying the gRPC status.

    NormserveError            .code (grpc.StatusCode), .message (the server's words)
     +-- NotFoundError           NOT_FOUND: no such session
     +-- AlreadyExistsError      ALREADY_EXISTS: the session id is taken
     +-- InvalidArgumentError    INVALID_ARGUMENT: the request was wrong; the message names the field
     +-- FailedPreconditionError FAILED_PRECONDITION: not possible on this server (e.g. no CUDA)
     +-- ResourceExhaustedError  RESOURCE_EXHAUSTED: a server limit, or a message too large
     +-- DeadlineExceededError   DEADLINE_EXCEEDED: the per-call timeout passed
     +-- UnavailableError        UNAVAILABLE: the server cannot be reached (or is shutting down)

A raw ``grpc.RpcError`` never escapes the client.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NormserveError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "from_rpc_error",
]


class NormserveError(Exception):
    """A call failed; ``code`` is the gRPC status code and ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class NotFoundError(NormserveError):
    pass


class AlreadyExistsError(NormserveError):
    pass


class InvalidArgumentError(NormserveError):
    pass


class FailedPreconditionError(NormserveError):
    pass


class ResourceExhaustedError(NormserveError):
    pass


class DeadlineExceededError(NormserveError):
    pass


class UnavailableError(NormserveError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[NormserveError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def from_rpc_error(err: grpc.RpcError) -> NormserveError:
    """The project's error for a ``grpc.RpcError`` (sync or aio)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    code = code or grpc.StatusCode.UNKNOWN
    return _BY_CODE.get(code, NormserveError)(code, details or "")
