"""The hot-path wire codec agrees byte for byte with protobuf, both ways."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import given, settings
from hypothesis import strategies as st

from normserve import wire
from normserve.v1 import normserve_pb2 as pb
from normserve.wire import TensorFormatError, tensor_from_proto, tensor_to_proto
from normserve.wire._frames import HANDLED

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
    import ctypes

    x = torch.randn(64, 256)
    raw = wire.encode_normalize_request("s", 1, x, False)
    t = wire.parse_normalize_request(raw).tensor()
    _same(t, x)
    addr = ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value  # raw's own buffer
    assert addr is not None
    # The data field is the message's last (statistics_only false is not written): a view starts
    # exactly x.nbytes before the end of raw; a copy would live anywhere else.
    assert t.data_ptr() == addr + len(raw) - x.nbytes


# ---- every field of the contract's hot messages is handled, both ways

_FD = FieldDescriptor
_TENSOR_BYTES = tensor_to_proto(torch.randn(2, 3)).SerializeToString()


def _sample(msg: Any, field: Any) -> None:
    """Sets ``field`` of ``msg`` to a value that is not its default (so protobuf writes it)."""
    if field.type == _FD.TYPE_MESSAGE and field.message_type.name == "SyncStep":
        getattr(msg, field.name).rank = 7
        getattr(msg, field.name).step = 9
        return
    if field.type == _FD.TYPE_MESSAGE and field.message_type.name == "Adaptation":
        getattr(msg, field.name).batch_weight = 0.25
        getattr(msg, field.name).accumulate = True
        return
    if field.type == _FD.TYPE_MESSAGE:
        assert field.message_type.name == "Tensor", (
            f"{field.full_name}: teach this test (and normserve.wire) a {field.message_type.name}"
        )
        getattr(msg, field.name).MergeFromString(_TENSOR_BYTES)
        return
    if field.type == _FD.TYPE_ENUM:
        value: Any = max(v.number for v in field.enum_type.values)
    elif field.type == _FD.TYPE_BOOL:
        value = True
    elif field.type == _FD.TYPE_STRING:
        value = "s-\u00e9"
    elif field.type == _FD.TYPE_BYTES:
        value = b"\x01\x02"
    elif field.type in (_FD.TYPE_DOUBLE, _FD.TYPE_FLOAT):
        value = 1.5
    else:  # the integer types
        value = 7
    if field.is_repeated:
        getattr(msg, field.name).extend([value, value])
    else:
        setattr(msg, field.name, value)


def _reencode_request(raw: bytes) -> bytes:
    f = wire.parse_normalize_request(raw)
    return wire.encode_normalize_request(
        f.session_id,
        f.mode,
        f.tensor(),
        f.statistics_only,
        f.idempotency_key,
        f.sync,
        f.time_step,
        f.adaptation,
    )


def _reencode_stream_request(raw: bytes) -> bytes:
    f = wire.parse_stream_request(raw)
    chunk = f.tensor() if f.has_tensor else None
    return wire.encode_stream_request(
        f.session_id,
        f.mode,
        chunk,
        f.end_of_batch,
        f.statistics_only,
        f.idempotency_key,
        f.time_step,
        f.sync,
        f.adaptation,
    )


def _reencode_response(raw: bytes) -> bytes:
    a = wire.parse_normalize_response(raw)
    assert a.mean is not None and a.var is not None
    return wire.encode_normalize_response(
        a.output, a.mean, a.var, a.version, a.batch_statistics, a.replayed
    )


def _reencode_stream_response(raw: bytes) -> bytes:
    a = wire.parse_stream_response(raw)
    return wire.encode_stream_response(
        a.batch_index,
        a.output,
        a.end_of_batch,
        a.mean,
        a.var,
        a.version,
        a.batch_statistics,
        a.replayed,
    )


# message name -> (parse then encode with normserve.wire, the fields the encoder needs set)
_REENCODE: dict[str, tuple[Callable[[bytes], bytes], tuple[str, ...]]] = {
    "NormalizeRequest": (_reencode_request, ("input",)),
    "NormalizeStreamRequest": (_reencode_stream_request, ()),
    "NormalizeResponse": (_reencode_response, ("mean", "var")),
    "NormalizeStreamResponse": (_reencode_stream_response, ()),
}


def test_handled_fields_are_exactly_the_contracts() -> None:
    """Walks each hot message's descriptor: the codec's table names every field, and every message
    type those fields carry is itself a hot message."""
    assert set(HANDLED) == {*_REENCODE, "Tensor", "SyncStep", "Adaptation"}
    for name, handled in HANDLED.items():
        fields = getattr(pb, name).DESCRIPTOR.fields
        assert {f.name for f in fields} == handled, name
        for f in fields:
            if f.type == _FD.TYPE_MESSAGE:
                assert f.message_type.name in HANDLED, f.full_name


@pytest.mark.parametrize("name", sorted(_REENCODE))
def test_every_field_survives_parse_and_encode(name: str) -> None:
    """Each field of the contract set alone (and all at once) comes back byte for byte from
    normserve.wire's parser and encoder: a field they skip cannot pass."""
    reencode, needed = _REENCODE[name]
    message = getattr(pb, name)
    fields = {f.name: f for f in message.DESCRIPTOR.fields}
    base = message()
    for needed_name in needed:
        _sample(base, fields[needed_name])
    everything = message()
    everything.CopyFrom(base)
    for field in fields.values():
        msg = message()
        msg.CopyFrom(base)
        if field.name not in needed:
            _sample(msg, field)
            _sample(everything, field)
        raw = msg.SerializeToString()
        assert reencode(raw) == raw, f"{name}.{field.name}"
    raw = everything.SerializeToString()
    assert {f.name for f, _ in everything.ListFields()} == set(fields)
    assert reencode(raw) == raw


def test_sync_step_is_read_present_even_at_rank_and_step_zero() -> None:
    for rank, step in ((0, 0), (3, 0), (0, 2**64 - 1), (4095, 12)):
        msg = pb.NormalizeRequest(session_id="s", sync=pb.SyncStep(rank=rank, step=step))
        msg.input.MergeFromString(_TENSOR_BYTES)
        raw = msg.SerializeToString()
        assert wire.parse_normalize_request(raw).sync == (rank, step)
        assert _reencode_request(raw) == raw
    assert wire.parse_normalize_request(pb.NormalizeRequest().SerializeToString()).sync is None
    for rank, step in ((0, 0), (7, 2**64 - 1)):
        smsg = pb.NormalizeStreamRequest(session_id="s", sync=pb.SyncStep(rank=rank, step=step))
        raw = smsg.SerializeToString()
        assert wire.parse_stream_request(raw).sync == (rank, step)
        assert _reencode_stream_request(raw) == raw
    assert wire.parse_stream_request(b"").sync is None


def test_adaptation_is_read_present_even_at_its_defaults() -> None:
    for weight, accumulate in ((0.0, False), (1.0, False), (0.3, True), (0.0, True)):
        msg = pb.NormalizeRequest(
            session_id="s", adaptation=pb.Adaptation(batch_weight=weight, accumulate=accumulate)
        )
        msg.input.MergeFromString(_TENSOR_BYTES)
        raw = msg.SerializeToString()
        assert wire.parse_normalize_request(raw).adaptation == (weight, accumulate)
        assert _reencode_request(raw) == raw
    assert wire.parse_normalize_request(_TENSOR_BYTES[:0]).adaptation is None


def test_stream_adaptation_is_read_present_even_at_its_defaults() -> None:
    for weight, accumulate in ((0.0, False), (1.0, False), (0.3, True), (0.0, True)):
        msg = pb.NormalizeStreamRequest(
            session_id="s", adaptation=pb.Adaptation(batch_weight=weight, accumulate=accumulate)
        )
        raw = msg.SerializeToString()
        assert wire.parse_stream_request(raw).adaptation == (weight, accumulate)
        assert _reencode_stream_request(raw) == raw
    assert wire.parse_stream_request(b"").adaptation is None


def test_every_tensor_field_survives_parse_and_encode() -> None:
    tensor_fields = pb.Tensor.DESCRIPTOR.fields
    request = pb.NormalizeRequest()
    request.input.MergeFromString(_TENSOR_BYTES)
    for field in tensor_fields:  # a field a real tensor leaves unset gets a value of its own
        if field.name not in {f.name for f, _ in request.input.ListFields()}:
            _sample(request.input, field)
    assert {f.name for f, _ in request.input.ListFields()} == {f.name for f in tensor_fields}
    raw = request.SerializeToString()
    assert _reencode_request(raw) == raw
