"""Server interceptors: the one table from domain error to gRPC status, and handler wrapping.

The error interceptor is the only place where exceptions become statuses. A ``ServiceError`` or a
malformed tensor keeps its message (it was written for the client); anything else is a bug: logged
with its traceback and answered INTERNAL with a generic message, never leaked.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from normserve.server._transport._context import current_request_id
from normserve.server.service import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    IdleTimeout,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from normserve.wire import TensorFormatError

__all__ = [
    "ERROR_STATUS",
    "ErrorInterceptor",
    "WrappingInterceptor",
    "status_for",
    "wrap_handler",
]

log = logging.getLogger("normserve.server")

#: Domain error -> status. The most specific class in an exception's MRO wins.
ERROR_STATUS: dict[type[BaseException], grpc.StatusCode] = {
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    TensorFormatError: grpc.StatusCode.INVALID_ARGUMENT,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IdleTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    Aborted: grpc.StatusCode.ABORTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    # a message of another service (health, reflection) that protobuf cannot parse
    DecodeError: grpc.StatusCode.INVALID_ARGUMENT,
    ServiceError: grpc.StatusCode.UNKNOWN,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and client-safe message for an exception."""
    for cls in type(exc).__mro__:
        code = ERROR_STATUS.get(cls)
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; the server logged the cause"


Behavior = Callable[..., Any]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[Behavior], Behavior],
    streaming: Callable[[Behavior], Behavior],
    request_deserializer: Callable[[bytes], Any] | None = None,
    response_serializer: Callable[[Any], bytes] | None = None,
) -> grpc.RpcMethodHandler:
    """A copy of ``handler`` whose behavior is wrapped: ``unary`` for the kinds that return one
    response, ``streaming`` for those that return an iterator; (de)serializers optionally replaced."""
    ser = {
        "request_deserializer": request_deserializer or handler.request_deserializer,
        "response_serializer": response_serializer or handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **ser)
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **ser)


def _status(
    exc: BaseException, context: grpc.aio.ServicerContext, method: str
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]] | None:
    if context.cancelled():
        return None  # the client is gone: its requests ending early is no error, nobody listens
    code, message = status_for(exc)
    request_id = current_request_id()
    if code is grpc.StatusCode.INTERNAL:
        log.error("unexpected error in %s", method, exc_info=exc, extra={"request_id": request_id})
        message = f"{message} (request id {request_id})"
    return code, message, ((("x-request-id", request_id),) if request_id else ())


async def _abort(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    status = _status(exc, context, method)
    if status is not None:
        # grpc.aio's abort sends its own trailing metadata argument, replacing any set before
        await context.abort(*status)


def _end_stream(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    """A streaming call's status, set for the handler to return with: grpc.aio's abort leaks
    ~2 KB of native memory per call when client messages are still unread (measured)."""
    status = _status(exc, context, method)
    if status is not None:
        code, message, trailing = status
        context.set_code(code)
        context.set_details(message)
        context.set_trailing_metadata(trailing)


class _Unparsed:
    """A request protobuf could not parse, handed to the behavior to refuse (grpc would answer a
    raising deserializer with UNKNOWN and the exception's text, before any interceptor runs)."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except (DecodeError, RuntimeWarning, ValueError) as err:
            return _Unparsed(str(err) or type(err).__name__)

    return parse


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that wraps each method's handler once (``_wrap``) and reuses the wrapper:
    building closures per call would cost every call for nothing."""

    def __init__(self) -> None:
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # type: ignore[return-value]  # unknown method: grpc answers UNIMPLEMENTED
        self._handlers[method] = wrapped = self._wrap(method, handler)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class ErrorInterceptor(WrappingInterceptor):
    """Turns exceptions into statuses through ``ERROR_STATUS``."""

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        def unary(fn: Behavior) -> Behavior:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    if isinstance(request, _Unparsed):
                        raise InvalidArgument("request", f"not a valid message ({request.error})")
                    return await fn(request, context)
                except grpc.aio.AbortError:
                    raise  # already a status
                except Exception as exc:
                    await _abort(exc, context, method)

            return behavior

        def streaming(fn: Behavior) -> Behavior:
            if not inspect.isasyncgenfunction(fn):
                return unary(fn)  # a coroutine that writes with context.write (health's Watch)

            async def behavior(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    if isinstance(request, _Unparsed):
                        raise InvalidArgument("request", f"not a valid message ({request.error})")
                    async for item in fn(request, context):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    _end_stream(exc, context, method)

            return behavior

        # one request message: parsed tolerantly, refused above (a stream's requests are parsed
        # as they are read, inside the behavior, and DecodeError has its row in the table)
        tolerant = None if handler.request_streaming else _tolerant(handler.request_deserializer)
        return wrap_handler(handler, unary, streaming, request_deserializer=tolerant)
