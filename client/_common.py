"""What the sync and asyncio clients share: result types, request building, chunking, assembly.

Both clients are thin shells over these functions, so they cannot drift apart.
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
import numpy as np
import torch
from grpc_health.v1 import health_pb2_grpc

from normserve import wire
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_from_proto, tensor_to_proto

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_TARGET",
    "ArrayLike",
    "ClientBase",
    "ModeName",
    "NormalizeResult",
    "SessionInfo",
]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Chunks of 1 MiB keep every message far below gRPC's 4 MiB default and serialize fastest.
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

ArrayLike = torch.Tensor | np.ndarray
#: gRPC metadata: (key, value) pairs sent with a call.
Metadata = Sequence[tuple[str, str]] | None
ModeName = Literal["train", "eval"]
_MODES = {"train": pb.MODE_TRAIN, "eval": pb.MODE_EVAL}


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server reported it. Tensors are None when absent or not asked for."""

    session_id: str
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    allow_non_finite: bool
    device: str
    version: int
    num_batches_tracked: int
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    create_time: dt.datetime
    update_time: dt.datetime

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tensors as lists)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                value = value.tolist()
            elif isinstance(value, dt.datetime):
                value = value.isoformat()
            out[key] = value
        return out


@dataclass(frozen=True)
class NormalizeResult:
    """One normalized batch: ``output`` (same type, shape, dtype and device as the input; None with
    statistics_only), the per-channel ``mean``/``var`` used, and the session ``version`` after it."""

    output: Any
    mean: torch.Tensor
    var: torch.Tensor
    version: int
    batch_statistics: bool


def mode_value(mode: ModeName | str) -> int:
    try:
        return _MODES[str(mode).lower()]
    except KeyError:
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}") from None


def as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _optional(msg: Any, field: str) -> torch.Tensor | None:
    return tensor_from_proto(getattr(msg, field), field).clone() if msg.HasField(field) else None


def session_info(msg: pb.Session) -> SessionInfo:
    cfg = msg.config
    return SessionInfo(
        session_id=msg.session_id,
        num_features=cfg.num_features,
        eps=cfg.eps,
        momentum=cfg.momentum if cfg.HasField("momentum") else None,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
        allow_non_finite=cfg.allow_non_finite,
        device=msg.device,
        version=msg.version,
        num_batches_tracked=msg.num_batches_tracked,
        running_mean=_optional(msg, "running_mean"),
        running_var=_optional(msg, "running_var"),
        weight=_optional(msg, "weight"),
        bias=_optional(msg, "bias"),
        create_time=msg.create_time.ToDatetime(dt.UTC),
        update_time=msg.update_time.ToDatetime(dt.UTC),
    )


def create_request(
    num_features: int,
    *,
    session_id: str = "",
    eps: float = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    track_running_stats: bool = True,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    device: str = "",
    allow_non_finite: bool = False,
) -> pb.CreateSessionRequest:
    cfg = pb.SessionConfig(
        kind=pb.NORM_KIND_BATCH_NORM,
        num_features=num_features,
        eps=eps,
        affine=affine,
        track_running_stats=track_running_stats,
        device=device,
        allow_non_finite=allow_non_finite,
    )
    if momentum is not None:
        cfg.momentum = momentum
    if weight is not None:
        tensor_to_proto(as_tensor(weight).float(), cfg.initial_weight)
    if bias is not None:
        tensor_to_proto(as_tensor(bias).float(), cfg.initial_bias)
    return pb.CreateSessionRequest(session_id=session_id, config=cfg)


def import_request(
    session_id: str, state: Mapping[str, ArrayLike], strict: bool
) -> pb.ImportStateRequest:
    entries = [
        pb.NamedTensor(name=key, tensor=tensor_to_proto(as_tensor(value)))
        for key, value in state.items()
    ]
    return pb.ImportStateRequest(session_id=session_id, entries=entries, strict=strict)


def state_dict(msg: pb.ExportStateResponse) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((e.name, tensor_from_proto(e.tensor, e.name).clone()) for e in msg.entries)


# ---- normalization: how a batch of the caller's type comes back as the same type


@dataclass(frozen=True)
class _Like:
    """What the caller sent, so the output can be given back in kind."""

    numpy: bool
    device: torch.device

    @staticmethod
    def of(x: ArrayLike) -> _Like:
        if isinstance(x, np.ndarray):
            return _Like(True, torch.device("cpu"))
        return _Like(False, x.device)

    def give(self, t: torch.Tensor | None) -> Any:
        if t is None:
            return None
        if self.numpy:
            return t.numpy()
        return t if self.device.type == "cpu" else t.to(self.device)


def fits_unary(x: torch.Tensor, chunk_bytes: int) -> bool:
    return x.numel() * x.element_size() <= chunk_bytes


NORMALIZE = "/normserve.v1.Normalizer/Normalize"
NORMALIZE_STREAM = "/normserve.v1.Normalizer/NormalizeStream"


def normalize_request(
    session_id: str, x: torch.Tensor, mode: ModeName | str, statistics_only: bool
) -> bytes:
    """An encoded NormalizeRequest: one copy of the tensor (see normserve.wire)."""
    return wire.encode_normalize_request(session_id, mode_value(mode), x, statistics_only)


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    # Received tensors view the response's immutable bytes; the clone makes them writable and
    # independent (one copy, the price of handing the caller an ordinary tensor).
    return None if t is None else t.clone()


def normalize_result(raw: bytes, like: _Like) -> NormalizeResult:
    answer = wire.parse_normalize_response(raw)
    assert answer.mean is not None and answer.var is not None
    return NormalizeResult(
        output=like.give(_own(answer.output)),
        mean=answer.mean.clone(),
        var=answer.var.clone(),
        version=answer.version,
        batch_statistics=answer.batch_statistics,
    )


def rows_per_chunk(x: torch.Tensor, chunk_bytes: int) -> int:
    row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 1
    return max(1, chunk_bytes // max(row_bytes, 1))


class StreamPlan:
    """Turns batches into chunk requests and answers back into results, for one stream.

    The request side records, per batch, how to give the output back; answers come in batch order,
    so the response side pops those records in the same order.
    """

    def __init__(
        self, session_id: str, mode: ModeName | str, statistics_only: bool, chunk_bytes: int
    ) -> None:
        self.session_id = session_id
        self.mode = mode_value(mode)
        self.statistics_only = statistics_only
        self.chunk_bytes = chunk_bytes
        self._likes: deque[_Like] = deque()
        self._chunks: list[torch.Tensor] = []
        self._header: wire.StreamAnswer | None = None

    def requests(self, batches: Iterable[ArrayLike]) -> Iterator[bytes]:
        for batch in batches:
            x = as_tensor(batch)
            if x.dim() == 0:
                raise ValueError("a batch must have at least 2 dimensions ([N, C, ...])")
            self._likes.append(_Like.of(batch))
            yield from self.batch_requests(x)

    def batch_requests(self, x: torch.Tensor) -> Iterator[bytes]:
        """One batch as encoded chunk messages; the first names session and mode."""
        rows = rows_per_chunk(x, self.chunk_bytes)
        n = x.shape[0]
        starts = list(range(0, n, rows)) or [0]
        last = len(starts) - 1
        for i, start in enumerate(starts):
            chunk = x[start : start + rows]
            if i == 0:
                yield wire.encode_stream_request(
                    self.session_id, self.mode, chunk, last == 0, self.statistics_only
                )
            else:
                yield wire.encode_stream_request("", 0, chunk, i == last, False)

    def feed(self, raw: bytes) -> NormalizeResult | None:
        """Takes one answer message; returns a result when a batch is complete."""
        msg = wire.parse_stream_response(raw)
        if self._header is None:
            self._header = msg
        if msg.output is not None:
            self._chunks.append(msg.output)
        if not msg.end_of_batch:
            return None
        head, chunks = self._header, self._chunks
        self._header, self._chunks = None, []
        like = self._likes.popleft() if self._likes else _Like(False, torch.device("cpu"))
        output = None
        if chunks:  # cat copies the views into one tensor the caller owns
            output = torch.cat(chunks) if len(chunks) > 1 else chunks[0].clone()
        assert head.mean is not None and head.var is not None
        return NormalizeResult(
            output=like.give(output),
            mean=head.mean.clone(),
            var=head.var.clone(),
            version=head.version,
            batch_statistics=head.batch_statistics,
        )


def channel_options(max_message_bytes: int, extra: Sequence[tuple[str, Any]] = ()) -> list[Any]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *extra,
    ]


class ClientBase:
    """What the sync and asyncio clients share: options, the channel's stubs, metadata.
    Subclasses say how to open the channel (``grpc`` or ``grpc.aio``)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Metadata = None,
    ) -> None:
        self.target = target
        self.metadata = tuple(metadata or ())
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._channel: Any = self._open(
            target, credentials, channel_options(max_message_bytes, options)
        )
        self._stub = pb_grpc.NormalizerStub(self._channel)
        # the tensor-carrying methods move raw bytes, encoded by normserve.wire (zero-copy reads)
        self._normalize = self._channel.unary_unary(NORMALIZE, _registered_method=True)
        self._normalize_stream = self._channel.stream_stream(
            NORMALIZE_STREAM, _registered_method=True
        )
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _open(self, target: str, credentials: grpc.ChannelCredentials | None, options: Any) -> Any:
        raise NotImplementedError

    def _metadata(self, extra: Metadata) -> tuple[tuple[str, str], ...] | None:
        """The client's metadata plus the call's (e.g. an ``x-request-id``)."""
        merged = self.metadata + tuple(extra or ())
        return merged or None
