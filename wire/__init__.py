"""The wire format shared by client and server: tensors to and from ``normserve.v1`` messages, and
the hot path's zero-copy codec for the four tensor-carrying messages.

Runtime code, not the contract: the contract is ``proto/normserve/v1/normserve.proto``.
"""

from __future__ import annotations

from normserve.wire._codec import (
    DTYPE_FROM_PROTO,
    DTYPE_TO_PROTO,
    MAX_TENSOR_BYTES,
    TensorFormatError,
    dtype_name,
    tensor_from_parts,
    tensor_from_proto,
    tensor_payload,
    tensor_to_proto,
)
from normserve.wire._frames import (
    NormalizeFrame,
    StreamAnswer,
    WireError,
    encode_normalize_request,
    encode_normalize_response,
    encode_stream_request,
    encode_stream_response,
    parse_normalize_request,
    parse_normalize_response,
    parse_stream_request,
    parse_stream_response,
)

__all__ = [
    "DTYPE_FROM_PROTO",
    "DTYPE_TO_PROTO",
    "MAX_TENSOR_BYTES",
    "NormalizeFrame",
    "StreamAnswer",
    "TensorFormatError",
    "WireError",
    "dtype_name",
    "encode_normalize_request",
    "encode_normalize_response",
    "encode_stream_request",
    "encode_stream_response",
    "parse_normalize_request",
    "parse_normalize_response",
    "parse_stream_request",
    "parse_stream_response",
    "tensor_from_parts",
    "tensor_from_proto",
    "tensor_payload",
    "tensor_to_proto",
]
