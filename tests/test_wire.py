"""The hot-path wire codec agrees byte for byte with protobuf, both ways."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normserve import _wire as wire
from normserve._codec import TensorFormatError, tensor_from_proto, tensor_to_proto
from normserve.v1 import normserve_pb2 as pb

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=5))
    dtype = draw(st.sampled_from(DTYPES))
    return torch.randn(shape).to(dtype) if shape else torch.tensor(1.5, dtype=dtype)


ids = st.text(min_size=0, max_size=20)
modes = st.integers(-3, 5)


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@settings(max_examples=150, deadline=None)
@given(sid=ids, mode=modes, x=tensors(), stats=st.booleans())
def test_request_bytes_equal_protobufs(sid: str, mode: int, x: torch.Tensor, stats: bool) -> None:
    ours = wire.encode_normalize_request(sid, mode, x, stats)
    theirs = pb.NormalizeRequest(
        session_id=sid, mode=mode, input=tensor_to_proto(x), statistics_only=stats
    )
    assert ours == theirs.SerializeToString()
    frame = wire.parse_normalize_request(theirs.SerializeToString())
    assert (frame.session_id, frame.mode, frame.statistics_only) == (sid, mode, stats)
    _same(frame.tensor(), x)


@settings(max_examples=100, deadline=None)
@given(sid=ids, mode=modes, x=st.none() | tensors(), end=st.booleans(), stats=st.booleans())
def test_stream_request_round_trip(
    sid: str, mode: int, x: torch.Tensor | None, end: bool, stats: bool
) -> None:
    ours = wire.encode_stream_request(sid, mode, x, end, stats)
    theirs = pb.NormalizeStreamRequest(
        session_id=sid, mode=mode, end_of_batch=end, statistics_only=stats
    )
    if x is not None:
        tensor_to_proto(x, theirs.chunk)
    assert ours == theirs.SerializeToString()
    frame = wire.parse_stream_request(ours)
    assert (frame.session_id, frame.mode, frame.end_of_batch, frame.statistics_only) == (
        sid,
        mode,
        end,
        stats,
    )
    assert frame.has_tensor == (x is not None)
    if x is not None:
        _same(frame.tensor(), x)


@settings(max_examples=100, deadline=None)
@given(out=st.none() | tensors(), version=st.integers(0, 2**64 - 1), batch=st.booleans())
def test_response_round_trip(out: torch.Tensor | None, version: int, batch: bool) -> None:
    mean, var = torch.randn(3), torch.rand(3)
    ours = wire.encode_normalize_response(out, mean, var, version, batch)
    theirs = pb.NormalizeResponse(
        mean=tensor_to_proto(mean),
        var=tensor_to_proto(var),
        version=version,
        batch_statistics=batch,
    )
    if out is not None:
        tensor_to_proto(out, theirs.output)
    assert ours == theirs.SerializeToString()
    answer = wire.parse_normalize_response(ours)
    _same(answer.mean, mean)
    assert answer.version == version and answer.batch_statistics == batch
    if out is not None:
        _same(answer.output, out)


@settings(max_examples=60, deadline=None)
@given(
    index=st.integers(0, 1000), chunk=st.none() | tensors(), end=st.booleans(), head=st.booleans()
)
def test_stream_response_round_trip(
    index: int, chunk: torch.Tensor | None, end: bool, head: bool
) -> None:
    mean, var = (torch.randn(2), torch.rand(2)) if head else (None, None)
    ours = wire.encode_stream_response(index, chunk, end, mean, var, 7 if head else 0, head)
    theirs = pb.NormalizeStreamResponse(
        batch_index=index, end_of_batch=end, version=7 if head else 0, batch_statistics=head
    )
    if chunk is not None:
        tensor_to_proto(chunk, theirs.chunk)
    if head:
        tensor_to_proto(mean, theirs.mean)
        tensor_to_proto(var, theirs.var)
    assert ours == theirs.SerializeToString()
    answer = wire.parse_stream_response(ours)
    assert (answer.batch_index, answer.end_of_batch) == (index, end)
    if chunk is not None:
        _same(answer.output, chunk)


def test_parser_accepts_what_protobuf_accepts() -> None:
    """Unknown fields, reordered fields, unpacked shapes and a split message field."""
    x = torch.randn(2, 3)
    t = tensor_to_proto(x)
    unpacked_shape = b"".join(bytes([0x10, d]) for d in (2, 3))  # field 2, varint, unpacked
    tensor_bytes = (
        bytes([0x08, t.dtype]) + unpacked_shape + pb.Tensor(data=t.data).SerializeToString()
    )
    unknown = bytes([0x78, 0x05]) + bytes([0x82, 0x01, 0x02, 0xAA, 0xBB])  # fields 15 and 16
    half1 = pb.NormalizeRequest(input=pb.Tensor(dtype=t.dtype)).SerializeToString()
    raw = (
        unknown
        + pb.NormalizeRequest(mode=pb.MODE_EVAL).SerializeToString()
        + bytes([0x1A, len(tensor_bytes)])
        + tensor_bytes
        + pb.NormalizeRequest(session_id="s").SerializeToString()
    )
    reference = pb.NormalizeRequest.FromString(raw)
    frame = wire.parse_normalize_request(raw)
    assert (frame.session_id, frame.mode) == (reference.session_id, reference.mode)
    _same(frame.tensor(), tensor_from_proto(reference.input))
    split = (
        half1 + pb.NormalizeRequest(input=pb.Tensor(shape=[2, 3], data=t.data)).SerializeToString()
    )
    _same(
        wire.parse_normalize_request(split).tensor(),
        tensor_from_proto(pb.NormalizeRequest.FromString(split).input),
    )


@pytest.mark.parametrize("raw", [b"\x0a\x05ab", b"\x80", b"\x0b", b"\x00\x01", b"\x1a\x03\x08\x01"])
def test_garbage_is_a_format_error(raw: bytes) -> None:
    with pytest.raises(TensorFormatError):
        wire.parse_normalize_request(raw).tensor()


def test_tensor_views_the_received_bytes() -> None:
    x = torch.randn(64, 256)
    raw = wire.encode_normalize_request("s", 1, x, False)
    t = wire.parse_normalize_request(raw).tensor()
    base = memoryview(raw)
    assert base.obj is raw
    start = t.data_ptr()
    import ctypes

    addr = ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value
    assert addr is not None and addr <= start < addr + len(raw)  # inside the message: no copy
