"""The gRPC servicer (grpc.aio): each RPC converts its message, makes one service call, converts
back. Errors are raised as service errors; the error interceptor turns them into statuses. Every
call acts as the tenant the auth interceptor identified (``_tenant``): the facade's view of that
tenant's sessions and quotas."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from normserve.server._transport import _converters as conv
from normserve.server._transport._context import current_tenant
from normserve.server.service import IncompleteStream, InvalidArgument, NormalizerService
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

__all__ = ["RAW_METHODS", "SERVICE", "NormalizerServicer", "handlers"]

SERVICE = pb.DESCRIPTOR.services_by_name["Normalizer"]
#: grpc.aio.ServicerContext (grpc ships no type information)
Context: TypeAlias = Any


class NormalizerServicer(pb_grpc.NormalizerServicer):
    def __init__(self, service: NormalizerService) -> None:
        self.service = service

    def _as_caller(self) -> NormalizerService:
        """The service as the calling tenant sees it."""
        return self.service.for_tenant(current_tenant())

    async def CreateSession(
        self, request: pb.CreateSessionRequest, context: Context
    ) -> pb.CreateSessionResponse:
        cfg, weight, bias = conv.config(request.config)
        view = await self._as_caller().create_session(cfg, request.session_id, weight, bias)
        return pb.CreateSessionResponse(session=conv.session(view))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        view = await self._as_caller().get_session(request.session_id)
        return pb.GetSessionResponse(session=conv.session(view, not request.omit_tensors))

    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        page, token = await self._as_caller().list_sessions(request.page_size, request.page_token)
        return pb.ListSessionsResponse(
            sessions=[conv.session(v, with_tensors=False) for v in page], next_page_token=token
        )

    async def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: Context
    ) -> pb.DeleteSessionResponse:
        await self._as_caller().delete_session(request.session_id)
        return pb.DeleteSessionResponse()

    async def ResetSession(
        self, request: pb.ResetSessionRequest, context: Context
    ) -> pb.ResetSessionResponse:
        view = await self._as_caller().reset_session(request.session_id)
        return pb.ResetSessionResponse(session=conv.session(view))

    async def ExportState(
        self, request: pb.ExportStateRequest, context: Context
    ) -> pb.ExportStateResponse:
        return conv.export_response(*await self._as_caller().export_state(request.session_id))

    async def ImportState(
        self, request: pb.ImportStateRequest, context: Context
    ) -> pb.ImportStateResponse:
        entries = conv.state_entries(list(request.entries))
        view = await self._as_caller().import_state(request.session_id, entries, request.strict)
        return pb.ImportStateResponse(session=conv.session(view))

    async def SyncReduce(
        self, request: pb.SyncReduceRequest, context: Context
    ) -> pb.SyncReduceResponse:
        reduced = await self._as_caller().sync_reduce(*conv.sync_reduce_request(request))
        return conv.sync_reduce_response(reduced)

    async def _change(self, request: Any, change: str) -> pb.Session:
        return conv.session(await self._as_caller().change_session(request.session_id, change))

    async def StartCalibration(
        self, request: pb.StartCalibrationRequest, context: Context
    ) -> pb.StartCalibrationResponse:
        return pb.StartCalibrationResponse(session=await self._change(request, "start_calibration"))

    async def CommitCalibration(
        self, request: pb.CommitCalibrationRequest, context: Context
    ) -> pb.CommitCalibrationResponse:
        return pb.CommitCalibrationResponse(
            session=await self._change(request, "commit_calibration")
        )

    async def AbortCalibration(
        self, request: pb.AbortCalibrationRequest, context: Context
    ) -> pb.AbortCalibrationResponse:
        return pb.AbortCalibrationResponse(session=await self._change(request, "abort_calibration"))

    async def FreezeSession(
        self, request: pb.FreezeSessionRequest, context: Context
    ) -> pb.FreezeSessionResponse:
        return pb.FreezeSessionResponse(session=await self._change(request, "freeze"))

    async def UnfreezeSession(
        self, request: pb.UnfreezeSessionRequest, context: Context
    ) -> pb.UnfreezeSessionResponse:
        return pb.UnfreezeSessionResponse(session=await self._change(request, "unfreeze"))

    async def ResetAdaptation(
        self, request: pb.ResetAdaptationRequest, context: Context
    ) -> pb.ResetAdaptationResponse:
        return pb.ResetAdaptationResponse(session=await self._change(request, "reset_adaptation"))

    async def PromoteAdaptation(
        self, request: pb.PromoteAdaptationRequest, context: Context
    ) -> pb.PromoteAdaptationResponse:
        return pb.PromoteAdaptationResponse(
            session=await self._change(request, "promote_adaptation")
        )

    # The two methods that carry tensors take and return raw bytes: normserve.wire reads them
    # zero-copy and writes them with one copy (see handlers()).

    async def Normalize(self, request: bytes, context: Context) -> bytes:
        return await self._as_caller().normalize(
            conv.normalize_call(request), conv.normalize_response
        )

    async def NormalizeStream(
        self, request_iterator: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        try:
            async for answer in self._as_caller().stream(
                conv.stream_chunks(request_iterator), conv.stream_answer
            ):
                yield answer
        except IncompleteStream:
            # grpc.aio can end a cancelled call's requests before it reports the cancellation:
            # wait a moment, so that a client that gave up is counted CANCELLED, not as a
            # malformed stream (this is an error path anyway)
            await asyncio.sleep(0.1)
            raise


RAW_METHODS = frozenset({"Normalize", "NormalizeStream"})


class _Malformed:
    """What a request that protobuf cannot parse becomes, so the handler can refuse it with
    INVALID_ARGUMENT (grpc would answer a raising deserializer with INTERNAL, before any
    interceptor sees the call)."""

    __slots__ = ("error", "message")

    def __init__(self, message: str, error: str) -> None:
        self.message, self.error = message, error


def _parser(cls: Any) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except (DecodeError, RuntimeWarning, ValueError) as err:
            return _Malformed(cls.DESCRIPTOR.full_name, str(err) or type(err).__name__)

    return parse


def _refusing_malformed(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def behavior(request: Any, context: Context) -> Any:
        if isinstance(request, _Malformed):
            raise InvalidArgument(
                "request", f"not a valid {request.message} message ({request.error})"
            )
        return await fn(request, context)

    return behavior


def handlers(servicer: NormalizerServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The service's method handlers, from its descriptor: generated message classes for every
    method but those in RAW_METHODS, which get the bytes as they arrive."""
    out = {}
    for method in SERVICE.methods:
        behavior = getattr(servicer, method.name)
        codecs: dict[str, Any] = {}
        if method.name not in RAW_METHODS:
            assert not method.client_streaming, "a protobuf-decoded stream needs its own check"
            behavior = _refusing_malformed(behavior)
            codecs = {
                "request_deserializer": _parser(GetMessageClass(method.input_type)),
                "response_serializer": GetMessageClass(method.output_type).SerializeToString,
            }
        make = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[method.client_streaming, method.server_streaming]
        out[method.name] = make(behavior, **codecs)
    return out
