"""The hot path's wire codec: Normalize and NormalizeStream messages without protobuf's copies.

protobuf's Python runtime copies a ``bytes`` field when it parses a message, again when the field is
read, and again when a message is serialized. For tensors that is most of the cost of a call, so
the four messages that carry tensors (and their ``Tensor``) are read and written here directly in
the protobuf wire format (byte-for-byte what protobuf produces and accepts, checked against it by
property tests):

- parsing views the tensor bytes inside the received buffer (``torch.frombuffer``, no copy);
- encoding joins a few header bytes with the tensor's own buffer (one copy, the join).

Field numbers come from the generated descriptors, never from literals, and ``HANDLED`` names
every field this module reads and writes: a field added to the contract and missing from it fails
``tests/test_wire.py``, so the fast path cannot drop it silently. Every other message goes through
the generated code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import torch
from google.protobuf.descriptor import FieldDescriptor

from normserve.v1 import normserve_pb2 as pb
from normserve.wire._codec import TensorFormatError, tensor_from_parts, tensor_payload

__all__ = [
    "HANDLED",
    "NormalizeFrame",
    "StreamAnswer",
    "WireError",
    "encode_normalize_request",
    "encode_normalize_response",
    "encode_stream_request",
    "encode_stream_response",
    "parse_normalize_request",
    "parse_normalize_response",
    "parse_stream_request",
    "parse_stream_response",
]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_U64 = 1 << 64

#: The messages this module reads and writes, and the fields of each that both its parser and its
#: encoder handle. It must equal each message's fields in the contract (a test checks this, and
#: that each field survives a parse and re-encode byte for byte).
HANDLED: dict[str, frozenset[str]] = {
    "Tensor": frozenset({"dtype", "shape", "data"}),
    "NormalizeRequest": frozenset(
        {
            "session_id",
            "mode",
            "input",
            "statistics_only",
            "idempotency_key",
            "sync",
            "time_step",
            "adaptation",
        }
    ),
    "SyncStep": frozenset({"rank", "step"}),
    "Adaptation": frozenset({"batch_weight", "accumulate"}),
    "NormalizeResponse": frozenset(
        {"output", "mean", "var", "version", "batch_statistics", "replayed"}
    ),
    "NormalizeStreamRequest": frozenset(
        {
            "session_id",
            "mode",
            "chunk",
            "end_of_batch",
            "statistics_only",
            "idempotency_key",
            "time_step",
            "sync",
            "adaptation",
        }
    ),
    "NormalizeStreamResponse": frozenset(
        {
            "batch_index",
            "chunk",
            "end_of_batch",
            "mean",
            "var",
            "version",
            "batch_statistics",
            "replayed",
        }
    ),
}

_F = FieldDescriptor
_WIRE_TYPE = {
    _F.TYPE_BOOL: _VARINT,
    _F.TYPE_ENUM: _VARINT,
    _F.TYPE_INT64: _VARINT,
    _F.TYPE_UINT64: _VARINT,
    _F.TYPE_UINT32: _VARINT,
    _F.TYPE_STRING: _LEN,
    _F.TYPE_BYTES: _LEN,
    _F.TYPE_MESSAGE: _LEN,
    _F.TYPE_DOUBLE: _I64,
}


def _number(message: Any, name: str, wire: int, repeated: bool = False) -> int:
    """The number of ``message``'s field ``name``, from the generated descriptor. Fails at import
    when the contract no longer has the field, or gave it a type this module does not read and
    write as ``wire``."""
    d = message.DESCRIPTOR
    f = d.fields_by_name.get(name)
    if f is None or name not in HANDLED[d.name]:
        raise ImportError(
            f"normserve.wire: {d.full_name} has no field {name!r} (or HANDLED lacks it)"
        )
    if _WIRE_TYPE.get(f.type) != wire or f.is_repeated != repeated:
        raise ImportError(f"normserve.wire: {d.full_name}.{name} changed type in the contract")
    return int(f.number)


# Field numbers, one constant each: the parser compares them as plain ints on the hot path.
_T_DTYPE = _number(pb.Tensor, "dtype", _VARINT)
# repeated int64: written packed (LEN), read packed or not (VARINT), as protobuf does
_T_SHAPE = _number(pb.Tensor, "shape", _VARINT, repeated=True)
_T_DATA = _number(pb.Tensor, "data", _LEN)


class WireError(TensorFormatError):
    """Bytes that are not a valid encoding of the expected message."""


# ---- reading


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    if pos < end and buf[pos] < 0x80:  # the common case: one byte
        return buf[pos], pos + 1
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("message", "truncated or overlong varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _signed(v: int) -> int:
    return v - _U64 if v >= 1 << 63 else v


def _fields(buf: memoryview, pos: int, end: int) -> Any:
    """Yields (field number, wire type, value): an int for varints and fixed widths, a
    (start, stop) pair for length-delimited fields. Skips nothing itself; callers skip the fields
    the contract does not know (a newer peer's), as protobuf does."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("message", "field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise WireError("message", "truncated length-delimited field")
            yield number, wire, (pos, pos + size)
            pos += size
        elif wire == _I64:
            if pos + 8 > end:
                raise WireError("message", "truncated fixed64 field")
            pos += 8
            yield number, wire, pos - 8  # where its 8 bytes start (Adaptation's double reads them)
        elif wire == _I32:
            pos += 4
            yield number, wire, 0
        else:
            raise WireError("message", f"unsupported wire type {wire}")
    if pos != end:
        raise WireError("message", "truncated field")


def _tensor(buf: memoryview, start: int, end: int, field: str) -> torch.Tensor:
    code = 0
    shape: list[int] = []
    data: Any = b""
    for number, wire, value in _fields(buf, start, end):
        if number == _T_DTYPE and wire == _VARINT:
            code = _signed(value)
        elif number == _T_SHAPE and wire == _LEN:  # packed repeated int64
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos, stop)
                shape.append(_signed(dim))
        elif number == _T_SHAPE and wire == _VARINT:  # unpacked, as a parser must also accept
            shape.append(_signed(value))
        elif number == _T_DATA and wire == _LEN:
            data = buf[value[0] : value[1]]
    return tensor_from_parts(code, shape, data, field)


def _text(buf: memoryview, span: tuple[int, int], field: str) -> str:
    try:
        return str(buf[span[0] : span[1]], "utf-8")
    except UnicodeDecodeError:
        raise WireError(field, "is not valid UTF-8") from None


@dataclass
class NormalizeFrame:
    """A NormalizeRequest or NormalizeStreamRequest, read. The tensor is decoded on demand by
    ``tensor()``, so that callers can check the session before the tensor's format."""

    session_id: str = ""
    mode: int = 0
    statistics_only: bool = False
    end_of_batch: bool = False
    has_tensor: bool = False
    idempotency_key: str = ""
    #: NormalizeRequest.sync (or NormalizeStreamRequest.sync) as (rank, step); None when absent
    sync: tuple[int, int] | None = None
    time_step: int = 0
    #: NormalizeRequest.adaptation as (batch_weight, accumulate); None when absent
    adaptation: tuple[float, bool] | None = None
    _buf: memoryview | None = None
    _span: tuple[int, int] = (0, 0)
    _name: str = ""

    def tensor(self) -> torch.Tensor:
        """The tensor, viewing the received bytes; TensorFormatError if it is malformed or absent
        (an absent tensor reads as protobuf's empty default: an unspecified dtype)."""
        if self._buf is None:
            return tensor_from_parts(0, [], b"", self._name)
        return _tensor(self._buf, self._span[0], self._span[1], self._name)


@dataclass(frozen=True)
class _RequestFields:
    """The field numbers of a NormalizeRequest or NormalizeStreamRequest (0: no such field; no
    field has number 0, so it never matches)."""

    session_id: int
    mode: int
    tensor: int
    tensor_name: str
    statistics_only: int
    end_of_batch: int
    idempotency_key: int
    sync: int = 0
    time_step: int = 0
    adaptation: int = 0


_REQUEST = _RequestFields(
    session_id=_number(pb.NormalizeRequest, "session_id", _LEN),
    mode=_number(pb.NormalizeRequest, "mode", _VARINT),
    tensor=_number(pb.NormalizeRequest, "input", _LEN),
    tensor_name="input",
    statistics_only=_number(pb.NormalizeRequest, "statistics_only", _VARINT),
    end_of_batch=0,
    idempotency_key=_number(pb.NormalizeRequest, "idempotency_key", _LEN),
    sync=_number(pb.NormalizeRequest, "sync", _LEN),
    time_step=_number(pb.NormalizeRequest, "time_step", _VARINT),
    adaptation=_number(pb.NormalizeRequest, "adaptation", _LEN),
)
_SYNC_RANK = _number(pb.SyncStep, "rank", _VARINT)
_SYNC_STEP = _number(pb.SyncStep, "step", _VARINT)


def _sync(buf: memoryview, span: tuple[int, int], old: tuple[int, int] | None) -> tuple[int, int]:
    """A SyncStep's (rank, step); merged into an earlier occurrence, as protobuf merges."""
    rank, step = old if old is not None else (0, 0)
    for number, wire, value in _fields(buf, span[0], span[1]):
        if wire == _VARINT:
            if number == _SYNC_RANK:
                rank = value & 0xFFFFFFFF
            elif number == _SYNC_STEP:
                step = value
    return rank, step


_ADAPT_WEIGHT = _number(pb.Adaptation, "batch_weight", _I64)
_ADAPT_ACCUMULATE = _number(pb.Adaptation, "accumulate", _VARINT)
_DOUBLE = struct.Struct("<d")


def _adaptation(
    buf: memoryview, span: tuple[int, int], old: tuple[float, bool] | None
) -> tuple[float, bool]:
    """An Adaptation's (batch_weight, accumulate); merged into an earlier occurrence."""
    weight, accumulate = old if old is not None else (0.0, False)
    for number, wire, value in _fields(buf, span[0], span[1]):
        if number == _ADAPT_WEIGHT and wire == _I64:
            (weight,) = _DOUBLE.unpack_from(buf, value)
        elif number == _ADAPT_ACCUMULATE and wire == _VARINT:
            accumulate = bool(value)
    return weight, accumulate


_STREAM_REQUEST = _RequestFields(
    session_id=_number(pb.NormalizeStreamRequest, "session_id", _LEN),
    mode=_number(pb.NormalizeStreamRequest, "mode", _VARINT),
    tensor=_number(pb.NormalizeStreamRequest, "chunk", _LEN),
    tensor_name="chunk",
    statistics_only=_number(pb.NormalizeStreamRequest, "statistics_only", _VARINT),
    end_of_batch=_number(pb.NormalizeStreamRequest, "end_of_batch", _VARINT),
    idempotency_key=_number(pb.NormalizeStreamRequest, "idempotency_key", _LEN),
    time_step=_number(pb.NormalizeStreamRequest, "time_step", _VARINT),
    sync=_number(pb.NormalizeStreamRequest, "sync", _LEN),
    adaptation=_number(pb.NormalizeStreamRequest, "adaptation", _LEN),
)


def _frame(raw: bytes, f: _RequestFields) -> NormalizeFrame:
    buf = memoryview(raw)
    frame = NormalizeFrame(_name=f.tensor_name)
    spans: list[tuple[int, int]] = []
    sid_n, mode_n, tensor_n, stats_n, end_n = (
        f.session_id,
        f.mode,
        f.tensor,
        f.statistics_only,
        f.end_of_batch,
    )
    for number, wire, value in _fields(buf, 0, len(buf)):
        if wire == _LEN:
            if number == tensor_n:
                spans.append(value)
            elif number == sid_n:
                frame.session_id = _text(buf, value, "session_id")
            elif number == f.idempotency_key:
                frame.idempotency_key = _text(buf, value, "idempotency_key")
            elif number == f.sync:
                frame.sync = _sync(buf, value, frame.sync)
            elif number == f.adaptation:
                frame.adaptation = _adaptation(buf, value, frame.adaptation)
        elif wire == _VARINT:
            if number == mode_n:
                frame.mode = _signed(value)
            elif number == stats_n:
                frame.statistics_only = bool(value)
            elif number == end_n:
                frame.end_of_batch = bool(value)
            elif number == f.time_step:
                frame.time_step = _signed(value)
    if len(spans) == 1:
        frame._buf, frame._span = buf, spans[0]
    elif spans:
        # protobuf merges repeated occurrences of a message field; rare enough to pay a copy
        merged = b"".join(raw[s:e] for s, e in spans)
        frame._buf, frame._span = memoryview(merged), (0, len(merged))
    frame.has_tensor = bool(spans)
    return frame


def parse_normalize_request(raw: bytes) -> NormalizeFrame:
    return _frame(raw, _REQUEST)


def parse_stream_request(raw: bytes) -> NormalizeFrame:
    return _frame(raw, _STREAM_REQUEST)


@dataclass
class StreamAnswer:
    """A NormalizeResponse or NormalizeStreamResponse, read; tensors view the received bytes."""

    batch_index: int = 0
    output: torch.Tensor | None = None
    end_of_batch: bool = False
    mean: torch.Tensor | None = None
    var: torch.Tensor | None = None
    version: int = 0
    batch_statistics: bool = False
    replayed: bool = False


def _answer_fields(
    message: Any, tensors: dict[str, str], scalars: dict[str, type]
) -> tuple[dict[int, str], dict[int, tuple[str, type]]]:
    """{number: StreamAnswer attribute} for the tensor fields (contract name -> attribute) and
    {number: (attribute, type)} for the scalar fields of a response message, built once."""
    return (
        {_number(message, name, _LEN): attr for name, attr in tensors.items()},
        {_number(message, name, _VARINT): (name, kind) for name, kind in scalars.items()},
    )


_RESPONSE = _answer_fields(
    pb.NormalizeResponse,
    {"output": "output", "mean": "mean", "var": "var"},
    {"version": int, "batch_statistics": bool, "replayed": bool},
)
_STREAM_RESPONSE = _answer_fields(
    pb.NormalizeStreamResponse,
    {"chunk": "output", "mean": "mean", "var": "var"},
    {
        "batch_index": int,
        "end_of_batch": bool,
        "version": int,
        "batch_statistics": bool,
        "replayed": bool,
    },
)


def _answer(raw: bytes, fields: tuple[dict[int, str], dict[int, tuple[str, type]]]) -> StreamAnswer:
    tensors, scalars = fields
    buf = memoryview(raw)
    answer = StreamAnswer()
    for number, wire, value in _fields(buf, 0, len(buf)):
        if wire == _LEN:
            name = tensors.get(number)
            if name is not None:
                setattr(answer, name, _tensor(buf, value[0], value[1], name))
        elif wire == _VARINT:
            scalar = scalars.get(number)
            if scalar is not None:
                setattr(answer, scalar[0], scalar[1](value))
    return answer


def parse_normalize_response(raw: bytes) -> StreamAnswer:
    return _answer(raw, _RESPONSE)


def parse_stream_response(raw: bytes) -> StreamAnswer:
    return _answer(raw, _STREAM_RESPONSE)


# ---- writing


def _enc_varint(v: int) -> bytes:
    if v < 0:
        v += _U64
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _key(message: Any, name: str, wire: int) -> bytes:
    """The encoded tag of a field: its number from the descriptor and its wire type."""
    return _enc_varint(_number(message, name, wire) << 3 | wire)


_K_DTYPE = _key(pb.Tensor, "dtype", _VARINT)
_K_SHAPE = _enc_varint(_T_SHAPE << 3 | _LEN)  # packed, as protobuf writes a repeated int64
_K_DATA = _key(pb.Tensor, "data", _LEN)

# Tensor headers depend only on (field, dtype, shape): a session sees few distinct ones, so they
# are built once. Bounded, so hostile shape variety cannot grow it without limit.
_HEADERS: dict[tuple[bytes, int, tuple[int, ...]], bytes] = {}
_MAX_HEADERS = 4096


def _tensor_header(key: bytes, code: int, shape: tuple[int, ...], nbytes: int) -> bytes:
    cache_key = (key, code, shape)
    head = _HEADERS.get(cache_key)
    if head is not None:
        return head
    dims = b"".join(_enc_varint(d) for d in shape)
    body = bytearray()
    if code:
        body += _K_DTYPE + _enc_varint(code)
    if dims:
        body += _K_SHAPE + _enc_varint(len(dims)) + dims
    if nbytes:
        body += _K_DATA + _enc_varint(nbytes)
    head = key + _enc_varint(len(body) + nbytes) + bytes(body)
    if len(_HEADERS) < _MAX_HEADERS:
        _HEADERS[cache_key] = head
    return head


def _tensor_parts(key: bytes, tensor: torch.Tensor) -> list[Any]:
    code, shape, data = tensor_payload(tensor)
    return [_tensor_header(key, code, shape, len(data)), data]


def _scalar(key: bytes, value: int) -> bytes:
    return key + _enc_varint(value) if value else b""


def _string(key: bytes, value: str) -> bytes:
    raw = value.encode()
    return key + _enc_varint(len(raw)) + raw if raw else b""


# Each encoder writes its fields in the order of their numbers, as protobuf does (the property
# tests compare the bytes).
_RQ = pb.NormalizeRequest
_K_RQ_SESSION_ID = _key(_RQ, "session_id", _LEN)
_K_RQ_MODE = _key(_RQ, "mode", _VARINT)
_K_RQ_INPUT = _key(_RQ, "input", _LEN)
_K_RQ_STATISTICS_ONLY = _key(_RQ, "statistics_only", _VARINT)
_K_RQ_IDEMPOTENCY_KEY = _key(_RQ, "idempotency_key", _LEN)
_K_RQ_TIME_STEP = _key(_RQ, "time_step", _VARINT)
_K_RQ_SYNC = _key(_RQ, "sync", _LEN)
_K_SYNC_RANK = _key(pb.SyncStep, "rank", _VARINT)
_K_SYNC_STEP = _key(pb.SyncStep, "step", _VARINT)
_K_RQ_ADAPTATION = _key(_RQ, "adaptation", _LEN)
_K_ADAPT_WEIGHT = _key(pb.Adaptation, "batch_weight", _I64)
_K_ADAPT_ACCUMULATE = _key(pb.Adaptation, "accumulate", _VARINT)


def encode_normalize_request(
    session_id: str,
    mode: int,
    tensor: torch.Tensor,
    statistics_only: bool,
    idempotency_key: str = "",
    sync: tuple[int, int] | None = None,
    time_step: int = 0,
    adaptation: tuple[float, bool] | None = None,
) -> bytes:
    parts = [_string(_K_RQ_SESSION_ID, session_id), _scalar(_K_RQ_MODE, mode)]
    parts += _tensor_parts(_K_RQ_INPUT, tensor)
    parts.append(_scalar(_K_RQ_STATISTICS_ONLY, int(statistics_only)))
    parts.append(_string(_K_RQ_IDEMPOTENCY_KEY, idempotency_key))
    parts.append(_scalar(_K_RQ_TIME_STEP, time_step))
    if sync is not None:  # present even when rank and step are 0
        body = _scalar(_K_SYNC_RANK, sync[0]) + _scalar(_K_SYNC_STEP, sync[1])
        parts.append(_K_RQ_SYNC + _enc_varint(len(body)) + body)
    if adaptation is not None:
        parts.append(_adaptation_part(_K_RQ_ADAPTATION, adaptation))
    return b"".join(parts)


_SQ = pb.NormalizeStreamRequest
_K_SQ_SESSION_ID = _key(_SQ, "session_id", _LEN)
_K_SQ_MODE = _key(_SQ, "mode", _VARINT)
_K_SQ_CHUNK = _key(_SQ, "chunk", _LEN)
_K_SQ_END_OF_BATCH = _key(_SQ, "end_of_batch", _VARINT)
_K_SQ_STATISTICS_ONLY = _key(_SQ, "statistics_only", _VARINT)
_K_SQ_IDEMPOTENCY_KEY = _key(_SQ, "idempotency_key", _LEN)
_K_SQ_TIME_STEP = _key(_SQ, "time_step", _VARINT)
_K_SQ_SYNC = _key(_SQ, "sync", _LEN)
_K_SQ_ADAPTATION = _key(_SQ, "adaptation", _LEN)


def _adaptation_part(key: bytes, adaptation: tuple[float, bool]) -> bytes:
    """An Adaptation field, present even when both are defaults: a = 0 is a choice."""
    weight, accumulate = adaptation
    body = _K_ADAPT_WEIGHT + _DOUBLE.pack(weight) if weight != 0.0 else b""
    body += _scalar(_K_ADAPT_ACCUMULATE, int(accumulate))
    return key + _enc_varint(len(body)) + body


def encode_stream_request(
    session_id: str,
    mode: int,
    tensor: torch.Tensor | None,
    end_of_batch: bool,
    statistics_only: bool,
    idempotency_key: str = "",
    time_step: int = 0,
    sync: tuple[int, int] | None = None,
    adaptation: tuple[float, bool] | None = None,
) -> bytes:
    parts = [_string(_K_SQ_SESSION_ID, session_id), _scalar(_K_SQ_MODE, mode)]
    if tensor is not None:
        parts += _tensor_parts(_K_SQ_CHUNK, tensor)
    parts += [
        _scalar(_K_SQ_END_OF_BATCH, int(end_of_batch)),
        _scalar(_K_SQ_STATISTICS_ONLY, int(statistics_only)),
        _string(_K_SQ_IDEMPOTENCY_KEY, idempotency_key),
        _scalar(_K_SQ_TIME_STEP, time_step),
    ]
    if sync is not None:  # present even when rank and step are 0
        body = _scalar(_K_SYNC_RANK, sync[0]) + _scalar(_K_SYNC_STEP, sync[1])
        parts.append(_K_SQ_SYNC + _enc_varint(len(body)) + body)
    if adaptation is not None:
        parts.append(_adaptation_part(_K_SQ_ADAPTATION, adaptation))
    return b"".join(parts)


_RS = pb.NormalizeResponse
_K_RS_OUTPUT = _key(_RS, "output", _LEN)
_K_RS_MEAN = _key(_RS, "mean", _LEN)
_K_RS_VAR = _key(_RS, "var", _LEN)
_K_RS_VERSION = _key(_RS, "version", _VARINT)
_K_RS_BATCH_STATISTICS = _key(_RS, "batch_statistics", _VARINT)
_K_RS_REPLAYED = _key(_RS, "replayed", _VARINT)


def encode_normalize_response(
    output: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    version: int,
    batch_statistics: bool,
    replayed: bool = False,
) -> bytes:
    parts: list[Any] = []
    if output is not None:
        parts += _tensor_parts(_K_RS_OUTPUT, output)
    parts += _tensor_parts(_K_RS_MEAN, mean) + _tensor_parts(_K_RS_VAR, var)
    parts += [
        _scalar(_K_RS_VERSION, version),
        _scalar(_K_RS_BATCH_STATISTICS, int(batch_statistics)),
        _scalar(_K_RS_REPLAYED, int(replayed)),
    ]
    return b"".join(parts)


_SS = pb.NormalizeStreamResponse
_K_SS_BATCH_INDEX = _key(_SS, "batch_index", _VARINT)
_K_SS_CHUNK = _key(_SS, "chunk", _LEN)
_K_SS_END_OF_BATCH = _key(_SS, "end_of_batch", _VARINT)
_K_SS_MEAN = _key(_SS, "mean", _LEN)
_K_SS_VAR = _key(_SS, "var", _LEN)
_K_SS_VERSION = _key(_SS, "version", _VARINT)
_K_SS_BATCH_STATISTICS = _key(_SS, "batch_statistics", _VARINT)
_K_SS_REPLAYED = _key(_SS, "replayed", _VARINT)


def encode_stream_response(
    batch_index: int,
    chunk: torch.Tensor | None,
    end_of_batch: bool,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    version: int = 0,
    batch_statistics: bool = False,
    replayed: bool = False,
) -> bytes:
    parts: list[Any] = [_scalar(_K_SS_BATCH_INDEX, batch_index)]
    if chunk is not None:
        parts += _tensor_parts(_K_SS_CHUNK, chunk)
    parts.append(_scalar(_K_SS_END_OF_BATCH, int(end_of_batch)))
    if mean is not None:
        parts += _tensor_parts(_K_SS_MEAN, mean)
    if var is not None:
        parts += _tensor_parts(_K_SS_VAR, var)
    parts += [
        _scalar(_K_SS_VERSION, version),
        _scalar(_K_SS_BATCH_STATISTICS, int(batch_statistics)),
        _scalar(_K_SS_REPLAYED, int(replayed)),
    ]
    return b"".join(parts)
