"""The gRPC servicer: each RPC converts its message, makes one service call, converts back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace
from time import perf_counter
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from normserve import _wire as wire
from normserve.server._transport import _converters as conv
from normserve.server._transport._observe import StageRecorder
from normserve.server.service import ChunkedBatch, InvalidArgument, SessionManager
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

__all__ = ["SERVICE", "NormalizerServicer", "handlers"]

SERVICE = pb.DESCRIPTOR.services_by_name["Normalizer"]


class NormalizerServicer(pb_grpc.NormalizerServicer):
    """Errors are raised as service errors; the error interceptor turns them into statuses."""

    def __init__(self, sessions: SessionManager, stages: StageRecorder | None = None) -> None:
        self.sessions = sessions
        self.stages = stages or StageRecorder(None)

    def CreateSession(
        self, request: pb.CreateSessionRequest, context: grpc.ServicerContext
    ) -> pb.CreateSessionResponse:
        cfg, weight, bias = conv.config(request.config)
        s = self.sessions.create(cfg, request.session_id, weight, bias)
        return pb.CreateSessionResponse(session=conv.session(s))

    def GetSession(
        self, request: pb.GetSessionRequest, context: grpc.ServicerContext
    ) -> pb.GetSessionResponse:
        s = self.sessions.get(request.session_id)
        return pb.GetSessionResponse(session=conv.session(s, not request.omit_tensors))

    def ListSessions(
        self, request: pb.ListSessionsRequest, context: grpc.ServicerContext
    ) -> pb.ListSessionsResponse:
        page, token = self.sessions.list(request.page_size, request.page_token)
        return pb.ListSessionsResponse(
            sessions=[conv.session(s, with_tensors=False) for s in page], next_page_token=token
        )

    def DeleteSession(
        self, request: pb.DeleteSessionRequest, context: grpc.ServicerContext
    ) -> pb.DeleteSessionResponse:
        self.sessions.delete(request.session_id)
        return pb.DeleteSessionResponse()

    def ResetSession(
        self, request: pb.ResetSessionRequest, context: grpc.ServicerContext
    ) -> pb.ResetSessionResponse:
        s = self.sessions.get(request.session_id)
        return pb.ResetSessionResponse(session=conv.session(s, state=s.reset()))

    def ExportState(
        self, request: pb.ExportStateRequest, context: grpc.ServicerContext
    ) -> pb.ExportStateResponse:
        state, version = self.sessions.get(request.session_id).export_state()
        return conv.export_response(state, version)

    def ImportState(
        self, request: pb.ImportStateRequest, context: grpc.ServicerContext
    ) -> pb.ImportStateResponse:
        s = self.sessions.get(request.session_id)
        new = s.import_state(conv.state_entries(list(request.entries)), request.strict)
        return pb.ImportStateResponse(session=conv.session(s, state=new))

    # The two methods that carry tensors take and return raw bytes: normserve._wire reads them
    # zero-copy and writes them with one copy (see handlers()).

    def Normalize(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        t0 = perf_counter()
        req = wire.parse_normalize_request(request)
        s = self.sessions.get(req.session_id)
        mode = conv.mode(req.mode)
        self.stages.label(s, mode)
        x = req.tensor()
        t1 = perf_counter()
        result = s.normalize(x, mode, req.statistics_only)
        t2 = perf_counter()
        response = conv.normalize_response(result)
        encode = perf_counter() - t2
        self.stages.batch("Normalize", s, mode, result, x.numel(), t1 - t0, encode)
        return response

    def NormalizeStream(
        self, request_iterator: Iterable[bytes], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        return _serve_stream(self.sessions, self.stages, request_iterator)


RAW_METHODS = frozenset({"Normalize", "NormalizeStream"})


def handlers(servicer: NormalizerServicer) -> dict[str, grpc.RpcMethodHandler]:
    """The service's method handlers, from its descriptor: generated message classes for every
    method but those in RAW_METHODS, which get the bytes as they arrive."""
    out = {}
    for method in SERVICE.methods:
        behavior = getattr(servicer, method.name)
        codecs: dict[str, Any] = {}
        if method.name not in RAW_METHODS:
            codecs = {
                "request_deserializer": GetMessageClass(method.input_type).FromString,
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


def _serve_stream(
    sessions: SessionManager, stages: StageRecorder, requests: Iterable[bytes]
) -> Iterator[bytes]:
    """The chunk protocol: the first chunk of a batch names session and mode, end_of_batch closes
    it; the answer is the statistics, then the output chunks, in batch order. A batch that needs
    its own statistics is answered after its last chunk; one that does not (EVAL with running
    statistics) is answered chunk by chunk as they arrive, so its transfers overlap."""
    batch: ChunkedBatch | None = None
    header: tuple[str, int, bool] = ("", 0, False)
    index = 0
    decode = encode = 0.0
    elements = sent = 0
    for raw in requests:
        t0 = perf_counter()
        req = wire.parse_stream_request(raw)
        if batch is None:
            header = (req.session_id, req.mode, req.statistics_only)
            session = sessions.get(req.session_id)
            mode = conv.mode(req.mode)
            stages.label(session, mode)
            batch = session.start_batch(mode, req.statistics_only)
            decode = encode = 0.0
            elements = sent = 0
        else:
            _check_header(req, header, index)
        if req.has_tensor:
            x = req.tensor()
            decode += perf_counter() - t0
            elements += x.numel()
            out = batch.add(x)
            if out is not None:  # pipelined: answer this chunk now
                t1 = perf_counter()
                msg = conv.stream_chunk(
                    batch.header() if not sent else None, out, index, req.end_of_batch
                )
                encode += perf_counter() - t1
                sent += 1
                yield msg
        if req.end_of_batch:
            result, count = batch.finish()
            if not sent:
                for t1, msg in conv.stream_answers(result, batch.outputs(), count, index):
                    encode += perf_counter() - t1
                    yield msg
                result = replace(result, compute_seconds=batch.compute_seconds)
            stages.batch(
                "NormalizeStream", batch.session, batch.mode, result, elements, decode, encode
            )
            batch = None
            index += 1
    if batch is not None:
        raise InvalidArgument(
            "end_of_batch",
            f"the stream ended in the middle of batch {index} (no chunk set end_of_batch); "
            "nothing of that batch was applied",
        )


def _check_header(req: wire.NormalizeFrame, header: tuple[str, int, bool], index: int) -> None:
    session_id, mode, stats_only = header
    if req.session_id and req.session_id != session_id:
        raise InvalidArgument(
            "session_id",
            f"a later chunk of batch {index} names session {req.session_id!r}, the first named "
            f"{session_id!r}; nothing of that batch was applied",
        )
    if req.mode and req.mode != mode:
        raise InvalidArgument(
            "mode", f"a later chunk of batch {index} changes the mode; nothing of it was applied"
        )
    if req.statistics_only and not stats_only:
        raise InvalidArgument(
            "statistics_only",
            f"a later chunk of batch {index} sets statistics_only; set it on the first chunk",
        )
