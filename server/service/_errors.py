"""The service's error hierarchy; the transport maps each class to one gRPC status in one table.

ServiceError
 +-- NotFound            a session id that does not exist
 +-- AlreadyExists       a client-chosen session id that is taken
 +-- InvalidArgument     a request that can never succeed as sent (names the field)
 |    +-- IncompleteStream   a stream that ended in the middle of a batch
 +-- FailedPrecondition  valid, but not in this server's state (e.g. CUDA asked, none here)
 +-- ResourceExhausted   a server limit (session count, message size) is reached
 +-- IdleTimeout         a stream sent nothing for the server's idle timeout
 +-- Aborted             an update lost too many races with other processes (retry)
 +-- Unavailable         the session store cannot be reached; nothing was applied (retry)
 +-- Unauthenticated     a caller without a valid credential (a transport's check)
"""

from __future__ import annotations

__all__ = [
    "Aborted",
    "AlreadyExists",
    "FailedPrecondition",
    "IdleTimeout",
    "IncompleteStream",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
]


class ServiceError(Exception):
    """Base of every error the service raises on purpose; its message is safe to show a client."""


class NotFound(ServiceError):
    pass


class AlreadyExists(ServiceError):
    pass


class InvalidArgument(ServiceError):
    """A bad field; the message starts with the field's name and says what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class IncompleteStream(InvalidArgument):
    """The requests ended before the batch's last chunk (a transport may see a client's
    cancellation this way first)."""


class FailedPrecondition(ServiceError):
    pass


class ResourceExhausted(ServiceError):
    pass


class IdleTimeout(ServiceError):
    pass


class Unauthenticated(ServiceError):
    pass


class Aborted(ServiceError):
    pass


class Unavailable(ServiceError):
    pass
