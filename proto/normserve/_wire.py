"""The hot path's wire codec: Normalize and NormalizeStream messages without protobuf's copies.

protobuf's Python runtime copies a ``bytes`` field when it parses a message, again when the field is
read, and again when a message is serialized. For tensors that is most of the cost of a call, so
the four messages that carry tensors are read and written here directly in the protobuf wire format
(byte-for-byte what protobuf produces and accepts, checked against it by property tests):

- parsing views the tensor bytes inside the received buffer (``torch.frombuffer``, no copy);
- encoding joins a few header bytes with the tensor's own buffer (one copy, the join).

Every other message goes through the generated code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from normserve._codec import TensorFormatError, tensor_from_parts, tensor_payload

__all__ = [
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
    (start, stop) pair for length-delimited fields. Skips nothing itself; callers ignore unknowns."""
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
            pos += 8
            yield number, wire, 0
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
        if number == 1 and wire == _VARINT:
            code = _signed(value)
        elif number == 2 and wire == _LEN:  # packed repeated int64
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos, stop)
                shape.append(_signed(dim))
        elif number == 2 and wire == _VARINT:  # unpacked, as a parser must also accept
            shape.append(_signed(value))
        elif number == 3 and wire == _LEN:
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
    _buf: memoryview | None = None
    _span: tuple[int, int] = (0, 0)
    _name: str = ""

    def tensor(self) -> torch.Tensor:
        """The tensor, viewing the received bytes; TensorFormatError if it is malformed or absent
        (an absent tensor reads as protobuf's empty default: an unspecified dtype)."""
        if self._buf is None:
            return tensor_from_parts(0, [], b"", self._name)
        return _tensor(self._buf, self._span[0], self._span[1], self._name)


def _frame(raw: bytes, tensor_field: int, tensor_name: str, stream: bool) -> NormalizeFrame:
    buf = memoryview(raw)
    frame = NormalizeFrame(_name=tensor_name)
    spans: list[tuple[int, int]] = []
    for number, wire, value in _fields(buf, 0, len(buf)):
        if number == 1 and wire == _LEN:
            frame.session_id = _text(buf, value, "session_id")
        elif number == 2 and wire == _VARINT:
            frame.mode = _signed(value)
        elif number == tensor_field and wire == _LEN:
            spans.append(value)
        elif number == 4 and wire == _VARINT:
            if stream:
                frame.end_of_batch = bool(value)
            else:
                frame.statistics_only = bool(value)
        elif stream and number == 5 and wire == _VARINT:
            frame.statistics_only = bool(value)
    if len(spans) == 1:
        frame._buf, frame._span = buf, spans[0]
    elif spans:
        # protobuf merges repeated occurrences of a message field; rare enough to pay a copy
        merged = b"".join(raw[s:e] for s, e in spans)
        frame._buf, frame._span = memoryview(merged), (0, len(merged))
    frame.has_tensor = bool(spans)
    return frame


def parse_normalize_request(raw: bytes) -> NormalizeFrame:
    return _frame(raw, 3, "input", stream=False)


def parse_stream_request(raw: bytes) -> NormalizeFrame:
    return _frame(raw, 3, "chunk", stream=True)


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


_KEYS = {(n, w): _enc_varint(n << 3 | w) for n in range(1, 16) for w in (_VARINT, _LEN)}
# Tensor headers depend only on (field, dtype, shape): a session sees few distinct ones, so they
# are built once. Bounded, so hostile shape variety cannot grow it without limit.
_HEADERS: dict[tuple[int, int, tuple[int, ...]], bytes] = {}
_MAX_HEADERS = 4096


def _tensor_header(number: int, code: int, shape: tuple[int, ...], nbytes: int) -> bytes:
    key = (number, code, shape)
    head = _HEADERS.get(key)
    if head is not None:
        return head
    dims = b"".join(_enc_varint(d) for d in shape)
    body = bytearray()
    if code:
        body += _KEYS[1, _VARINT] + _enc_varint(code)
    if dims:
        body += _KEYS[2, _LEN] + _enc_varint(len(dims)) + dims
    if nbytes:
        body += _KEYS[3, _LEN] + _enc_varint(nbytes)
    head = _KEYS[number, _LEN] + _enc_varint(len(body) + nbytes) + bytes(body)
    if len(_HEADERS) < _MAX_HEADERS:
        _HEADERS[key] = head
    return head


def _tensor_parts(number: int, tensor: torch.Tensor) -> list[Any]:
    code, shape, data = tensor_payload(tensor)
    return [_tensor_header(number, code, shape, len(data)), data]


def _scalar(number: int, value: int) -> bytes:
    return _KEYS[number, _VARINT] + _enc_varint(value) if value else b""


def _string(number: int, value: str) -> bytes:
    raw = value.encode()
    return _KEYS[number, _LEN] + _enc_varint(len(raw)) + raw if raw else b""


def encode_normalize_request(
    session_id: str, mode: int, tensor: torch.Tensor, statistics_only: bool
) -> bytes:
    parts = [_string(1, session_id), _scalar(2, mode)]
    parts += _tensor_parts(3, tensor)
    parts.append(_scalar(4, int(statistics_only)))
    return b"".join(parts)


def encode_stream_request(
    session_id: str,
    mode: int,
    tensor: torch.Tensor | None,
    end_of_batch: bool,
    statistics_only: bool,
) -> bytes:
    parts = [_string(1, session_id), _scalar(2, mode)]
    if tensor is not None:
        parts += _tensor_parts(3, tensor)
    parts += [_scalar(4, int(end_of_batch)), _scalar(5, int(statistics_only))]
    return b"".join(parts)


def encode_normalize_response(
    output: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    version: int,
    batch_statistics: bool,
) -> bytes:
    parts: list[Any] = []
    if output is not None:
        parts += _tensor_parts(1, output)
    parts += _tensor_parts(2, mean) + _tensor_parts(3, var)
    parts += [_scalar(4, version), _scalar(5, int(batch_statistics))]
    return b"".join(parts)


def encode_stream_response(
    batch_index: int,
    chunk: torch.Tensor | None,
    end_of_batch: bool,
    mean: torch.Tensor | None = None,
    var: torch.Tensor | None = None,
    version: int = 0,
    batch_statistics: bool = False,
) -> bytes:
    parts: list[Any] = [_scalar(1, batch_index)]
    if chunk is not None:
        parts += _tensor_parts(2, chunk)
    parts.append(_scalar(3, int(end_of_batch)))
    if mean is not None and var is not None:
        parts += _tensor_parts(4, mean) + _tensor_parts(5, var)
    parts += [_scalar(6, version), _scalar(7, int(batch_statistics))]
    return b"".join(parts)


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


_RESPONSE_TENSORS = {1: "output", 2: "mean", 3: "var"}
_STREAM_TENSORS = {2: "output", 4: "mean", 5: "var"}


def _answer(raw: bytes, tensors: dict[int, str], scalars: dict[int, str]) -> StreamAnswer:
    buf = memoryview(raw)
    answer = StreamAnswer()
    for number, wire, value in _fields(buf, 0, len(buf)):
        if wire == _LEN and number in tensors:
            name = tensors[number]
            setattr(answer, name, _tensor(buf, value[0], value[1], name))
        elif wire == _VARINT and number in scalars:
            name = scalars[number]
            setattr(answer, name, type(getattr(answer, name))(value))
    return answer


def parse_normalize_response(raw: bytes) -> StreamAnswer:
    return _answer(raw, _RESPONSE_TENSORS, {4: "version", 5: "batch_statistics"})


def parse_stream_response(raw: bytes) -> StreamAnswer:
    scalars = {1: "batch_index", 3: "end_of_batch", 6: "version", 7: "batch_statistics"}
    return _answer(raw, _STREAM_TENSORS, scalars)
