"""Per-call observability: request ids, per-RPC metrics and logs (an interceptor), stage metrics.

The interceptor times every RPC end to end, counts its bytes (by wrapping the (de)serializers, so the
sizes are the wire's and cost nothing extra), and records the status code. The servicer adds what
only it knows: the session's kind and the mode (as labels) and the stage times of each batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import itertools
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from normserve.server._metrics import Metrics
from normserve.server._transport._context import CallInfo, _current
from normserve.server._transport._interceptors import WrappingInterceptor, wrap_handler

__all__ = ["ObservabilityInterceptor", "StageRecorder"]

log = logging.getLogger("normserve.server.access")
REQUEST_ID_KEY = "x-request-id"


# Request ids: a random per-process prefix and a counter. Unique per process lifetime and across
# replicas with overwhelming probability, and far cheaper per call than uuid4 (a syscall).
_PREFIX = uuid.uuid4().hex[:8]
_COUNTER = itertools.count(1)


_CODES = {c.value[0]: c for c in grpc.StatusCode}

#: A client's request id is kept only if it is this: it goes into every log line of the call,
#: where a newline would forge a line of its own.
SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


def _request_id(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            if isinstance(value, str) and SAFE_REQUEST_ID.fullmatch(value):
                return value
            generated = f"{_PREFIX}-{next(_COUNTER):x}"
            log.info(
                "the client's x-request-id (%d characters) is not 1-128 of [A-Za-z0-9._:/-]; "
                "this call's id is %s instead",
                len(value),
                generated,
                extra={"request_id": generated},
            )
            return generated
    return f"{_PREFIX}-{next(_COUNTER):x}"


class ObservabilityInterceptor(WrappingInterceptor):
    """Outermost interceptor: request id, in-flight gauges, per-RPC histogram, counters, logs."""

    def __init__(self, metrics: Metrics | None) -> None:
        super().__init__()
        self.metrics = metrics

    def _wrap(self, full_method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        method = full_method.rsplit("/", 1)[-1]
        m = self.metrics
        is_stream = method == "NormalizeStream"
        inflight = m.inflight.labels(method) if m is not None else None

        def finish(call: CallInfo, context: grpc.aio.ServicerContext, t0: float, exc: Any) -> None:
            elapsed = time.perf_counter() - t0
            code = context.code()
            if isinstance(code, int):  # grpc.aio reports the raw integer of the status
                code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
            if code is None or code is grpc.StatusCode.OK:
                if context.cancelled() or isinstance(exc, asyncio.CancelledError | GeneratorExit):
                    # the client cancelled (or gRPC closed the stream at shutdown): not an error,
                    # whatever the handler made of its requests ending early
                    code = grpc.StatusCode.CANCELLED
                else:
                    code = grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN
            name = code.name
            if m is not None:
                m.record_call(method, call.kind, call.mode, name, elapsed, call.tenant)
            if code is grpc.StatusCode.OK:
                if log.isEnabledFor(logging.DEBUG):
                    log.debug(
                        "%s OK %.3fms", method, elapsed * 1e3, extra={"request_id": call.request_id}
                    )
            else:
                details = (context.details() if hasattr(context, "details") else "") or ""
                if code is grpc.StatusCode.CANCELLED and not details:
                    details = "cancelled by the client, or by the server's shutdown"
                log.info(
                    "%s %s %.3fms: %s",
                    method,
                    name,
                    elapsed * 1e3,
                    details.decode() if isinstance(details, bytes) else details,
                    extra={"request_id": call.request_id},
                )

        def enter(
            context: grpc.aio.ServicerContext,
        ) -> tuple[CallInfo, contextvars.Token[Any], float]:
            call = CallInfo(method, _request_id(context))
            if m is not None and inflight is not None:
                inflight.inc()
                if is_stream:
                    m.open_streams.inc()
            return call, _current.set(call), time.perf_counter()

        def leave(token: contextvars.Token[Any]) -> None:
            # A streaming handler's generator may be closed from another task (grpc finalizing
            # a stream its client left): the call's context is not that one, and nothing in it
            # was set; resetting raised "created in a different Context" as an unretrieved task
            # exception.
            with contextlib.suppress(ValueError):
                _current.reset(token)
            if m is not None and inflight is not None:
                inflight.dec()
                if is_stream:
                    m.open_streams.dec()

        def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                call, token, t0 = enter(context)
                exc = None
                try:
                    return await fn(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    finish(call, context, t0, exc)
                    leave(token)

            return behavior

        def streaming(fn: Callable[..., Any]) -> Callable[..., Any]:
            if not inspect.isasyncgenfunction(fn):
                return unary(fn)  # a coroutine that writes with context.write (health's Watch)

            async def behavior(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                call, token, t0 = enter(context)
                exc = None
                try:
                    async for item in fn(request, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    leave(token)
                    # A stream's outcome is known only once the call is over: a client that
                    # cancels may first end its requests, and the handler then ends normally.
                    context.add_done_callback(
                        lambda ctx: finish(call, ctx, t0, exc)  # type: ignore[arg-type]
                    )

            return behavior

        if m is None:
            return wrap_handler(handler, unary, streaming)
        hot = m.hot
        deserialize, serialize = handler.request_deserializer, handler.response_serializer
        key = (method,)

        def counting_deserializer(raw: bytes) -> Any:
            with hot.lock:
                hot.received.inc(key, len(raw))
            return deserialize(raw) if deserialize else raw

        def counting_serializer(msg: Any) -> bytes:
            raw = serialize(msg) if serialize else msg
            with hot.lock:
                hot.sent.inc(key, len(raw))
            return raw

        return wrap_handler(handler, unary, streaming, counting_deserializer, counting_serializer)


class StageRecorder:
    """The service's StageObserver: labels for the call's metrics, stage times, counters."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics

    def label(self, kind: str, mode: str) -> None:
        call = _current.get()
        if call is not None:
            call.kind, call.mode = kind, mode

    def batch(
        self,
        method: str,
        kind: str,
        mode: str,
        stages: tuple[float, float, float, float],
        elements: int,
        trained: bool,
    ) -> None:
        if self.metrics is not None:
            self.metrics.record_batch(method, kind, mode, stages, elements, trained)
