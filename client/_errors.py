"""The client's errors: every failed call raises a ``NormserveError`` carrying the gRPC status.

    NormserveError            .code (grpc.StatusCode), .message (the server's words)
     +-- NotFoundError           NOT_FOUND: no such session
     +-- AlreadyExistsError      ALREADY_EXISTS: the session id is taken
     +-- InvalidArgumentError    INVALID_ARGUMENT: the request was wrong; the message names the field
     +-- FailedPreconditionError FAILED_PRECONDITION: not possible on this server (e.g. no CUDA)
     +-- ResourceExhaustedError  RESOURCE_EXHAUSTED: a server limit, or a message too large
     +-- DeadlineExceededError   DEADLINE_EXCEEDED: the per-call timeout passed
     +-- UnavailableError        UNAVAILABLE: the server cannot be reached (or is shutting down)
     +-- AbortedError            ABORTED: nothing was applied, try again (a synchronized step a
                                 participant missed; an update that lost too many races)

A raw ``grpc.RpcError`` never escapes the client. Where the cause is recognisable (nothing listens
at the target, the target speaks HTTP/1 rather than gRPC, its host does not resolve, client and
server disagree on TLS or certificates), ``.hint`` says what to check, and ``str(err)`` ends with it.
"""

from __future__ import annotations

import grpc

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "NormserveError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "connect_hint",
    "from_rpc_error",
]


class NormserveError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` the server's (or gRPC's)
    explanation, and ``hint`` what to check when the cause is recognisable ("" otherwise)."""

    def __init__(self, code: grpc.StatusCode, message: str, hint: str = "") -> None:
        super().__init__(f"{code.name}: {message}" + (f" ({hint})" if hint else ""))
        self.code = code
        self.message = message
        self.hint = hint


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


class AbortedError(NormserveError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[NormserveError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.ABORTED: AbortedError,
}


# What gRPC's connection errors say (its wording, matched loosely), and what to check. Each needle
# is a substring, or a tuple of substrings that must all be there.
_Needle = str | tuple[str, ...]
#: Words of grpc's own transport failures (never of a status a server sends).
_TRANSPORT_MARKERS = (
    "failed to connect",
    "all addresses",
    "backends failing",
    "dns resolution",
    "resolving",
    "ssl",
    "tls",
    "handshake",
    "http/2",
    "http2",
    "socket closed",
)

_CONNECT_HINTS: tuple[tuple[tuple[_Needle, ...], str], ...] = (
    (
        ("connection refused",),
        "is the server running at {target}? Start one with: normserve serve --address {target}",
    ),
    (
        ("failed parsing http/2", "expected settings frame", "http/1", "http1"),
        "{target} answered, but not in gRPC: is it normserve's metrics port (HTTP; gRPC is on "
        "50051 by default) or another service?",
    ),
    (
        (
            "dns resolution failed",
            "errors resolving",
            "name not found",
            "name or service not known",
        ),
        "the host of {target} does not resolve: check --target (or NORMSERVE_TARGET)",
    ),
    # TLS: the wording of grpc's BoringSSL errors, most specific first
    (
        ("wrong_version_number",),
        "{target} does not speak TLS: connect without --tls/--ca-file (Python: no tls/ca_file), "
        "or serve TLS there (normserve serve --tls-cert ... --tls-key ...)",
    ),
    (
        ("certificate_verify_failed", "unable to get local issuer certificate"),
        "the certificate of {target} is not signed by a CA this client trusts: pass the CA that "
        "signed it with --ca-file (env NORMSERVE_CA_FILE; Python: ca_file=...)",
    ),
    (
        ("hostname verification",),
        "the certificate of {target} does not name that host: connect by a name or address in "
        "its subject alternative names",
    ),
    (
        # only while connecting: a call cut short by a server that stops says "socket closed" too
        (("failed to connect", "socket closed"), ("failed to connect", "connection reset")),
        "{target} closed the connection while it was being set up: a TLS server closes it on "
        "a client without TLS (use --tls or --ca-file), a mutual-TLS server on one without a "
        "client certificate signed by the CA it trusts (--cert-file and --key-file)",
    ),
    (
        ("ssl", "tls", "handshake"),
        "the TLS handshake with {target} failed: check that client and server agree on TLS "
        "(--tls, --ca-file) and, under mutual TLS, the client certificate (--cert-file, "
        "--key-file)",
    ),
)


def connect_hint(code: grpc.StatusCode, details: str, target: str | None) -> str:
    """What to check for a connection failure to ``target``; "" when the cause is not one of the
    recognisable ones."""
    if code is not grpc.StatusCode.UNAVAILABLE or not target:
        return ""
    lowered = details.lower()
    if not any(marker in lowered for marker in _TRANSPORT_MARKERS):
        return ""  # the server answered UNAVAILABLE itself (its store is down, it is draining)
    for needles, hint in _CONNECT_HINTS:
        for needle in needles:
            if all(part in lowered for part in ((needle,) if isinstance(needle, str) else needle)):
                return hint.format(target=target)
    return ""


def from_rpc_error(err: grpc.RpcError, target: str | None = None) -> NormserveError:
    """The project's error for a ``grpc.RpcError`` (sync or aio); ``target``, when given, lets a
    connection failure carry a hint."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    code = code or grpc.StatusCode.UNKNOWN
    details = details or ""
    return _BY_CODE.get(code, NormserveError)(code, details, connect_hint(code, details, target))
