"""The gRPC servicer: each RPC converts its message, makes one service call, converts back."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from time import perf_counter

import grpc

from normserve._codec import tensor_from_proto, tensor_to_proto
from normserve.server._transport import _converters as conv
from normserve.server._transport._observe import StageRecorder
from normserve.server.service import ChunkedBatch, InvalidArgument, SessionManager
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

__all__ = ["NormalizerServicer"]


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

    def Normalize(
        self, request: pb.NormalizeRequest, context: grpc.ServicerContext
    ) -> pb.NormalizeResponse:
        t0 = perf_counter()
        s = self.sessions.get(request.session_id)
        mode = conv.mode(request.mode)
        self.stages.label(s, mode)
        x = tensor_from_proto(request.input, "input")
        t1 = perf_counter()
        result = s.normalize(x, mode, request.statistics_only)
        t2 = perf_counter()
        response = conv.normalize_response(result)
        encode = perf_counter() - t2
        self.stages.batch("Normalize", s, mode, result, x.numel(), t1 - t0, encode)
        return response

    def NormalizeStream(
        self, request_iterator: Iterable[pb.NormalizeStreamRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.NormalizeStreamResponse]:
        return _serve_stream(self.sessions, self.stages, request_iterator)


def _serve_stream(
    sessions: SessionManager,
    stages: StageRecorder,
    requests: Iterable[pb.NormalizeStreamRequest],
) -> Iterator[pb.NormalizeStreamResponse]:
    """The chunk protocol: the first chunk of a batch names session and mode, end_of_batch closes
    it; the answer is the statistics, then the output chunks, in batch order."""
    batch: ChunkedBatch | None = None
    header: tuple[str, int, bool] = ("", 0, False)
    index = 0
    decode = 0.0
    elements = 0
    for req in requests:
        t0 = perf_counter()
        if batch is None:
            header = (req.session_id, req.mode, req.statistics_only)
            session = sessions.get(req.session_id)
            mode = conv.mode(req.mode)
            stages.label(session, mode)
            batch = session.start_batch(mode, req.statistics_only)
            decode = 0.0
            elements = 0
        else:
            _check_header(req, header, index)
        if req.HasField("chunk"):
            x = tensor_from_proto(req.chunk, "chunk")
            decode += perf_counter() - t0
            elements += x.numel()
            batch.add(x)
        if req.end_of_batch:
            result, outputs = batch.finish()
            t1 = perf_counter()
            msg = conv.stream_header(result, index)
            last = len(outputs) - 1
            if last < 0:  # statistics only
                msg.end_of_batch = True
            encode = perf_counter() - t1
            if last < 0:
                yield msg
            for i, out in enumerate(outputs):
                t1 = perf_counter()
                if i:
                    msg = pb.NormalizeStreamResponse(batch_index=index)
                tensor_to_proto(out, msg.chunk)
                msg.end_of_batch = i == last
                encode += perf_counter() - t1
                yield msg
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


def _check_header(
    req: pb.NormalizeStreamRequest, header: tuple[str, int, bool], index: int
) -> None:
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
