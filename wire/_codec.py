"""The wire format's Python face: torch tensors to and from ``normserve.v1.Tensor`` messages.

Shared by the client and the server so both sides agree byte for byte: raw little-endian bytes in C
order, with shape and dtype. Decoding is zero-copy (``torch.frombuffer`` over the received bytes).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from normserve.v1 import normserve_pb2 as pb

__all__ = [
    "DTYPE_FROM_PROTO",
    "DTYPE_TO_PROTO",
    "MAX_TENSOR_BYTES",
    "TensorFormatError",
    "dtype_name",
    "tensor_from_parts",
    "tensor_from_proto",
    "tensor_payload",
    "tensor_to_proto",
]

DTYPE_TO_PROTO: dict[torch.dtype, int] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.int64: pb.DTYPE_INT64,
}
DTYPE_FROM_PROTO: dict[int, torch.dtype] = {v: k for k, v in DTYPE_TO_PROTO.items()}
_ITEMSIZE: dict[int, int] = {
    code: torch.empty((), dtype=dt).element_size() for code, dt in DTYPE_FROM_PROTO.items()
}
# numpy has no bfloat16: its bytes travel through an int16 view
_NUMPY_VIEW = {torch.bfloat16: torch.int16}

# No single tensor may claim more than this (the product of a hostile shape can overflow int64).
MAX_TENSOR_BYTES = 1 << 40

_BIG_ENDIAN = sys.byteorder == "big"
_SWAP_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64}

# torch warns (once) that the buffer of an immutable ``bytes`` is not writable. normserve never
# writes into a decoded input, which is the whole point of the zero-copy view, so the warning is noise.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class TensorFormatError(ValueError):
    """A Tensor message that does not describe a valid tensor; ``field`` names where it was."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def dtype_name(dtype: torch.dtype | int) -> str:
    """``torch.float32`` or ``pb.DTYPE_FLOAT32`` -> ``"float32"``."""
    if isinstance(dtype, int):
        dtype = DTYPE_FROM_PROTO[dtype]
    return str(dtype).removeprefix("torch.")


def _supported() -> str:
    floats = ", ".join(
        pb.DType.Name(DTYPE_TO_PROTO[d]) for d in DTYPE_TO_PROTO if d.is_floating_point
    )
    return f"{floats} (DTYPE_INT64 only for num_batches_tracked)"


def tensor_payload(tensor: torch.Tensor) -> tuple[int, tuple[int, ...], memoryview]:
    """(dtype code, shape, raw little-endian C-order bytes as a buffer) of any tensor, copying only
    when it must (a device transfer, a non-contiguous layout, a big-endian host)."""
    try:
        code = DTYPE_TO_PROTO[tensor.dtype]
    except KeyError:
        raise TypeError(
            f"unsupported dtype {dtype_name(tensor.dtype)}; expected float32, float16, bfloat16 "
            "or float64 (int64 only for num_batches_tracked)"
        ) from None
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    view = _NUMPY_VIEW.get(t.dtype)
    array = (t if view is None else t.view(view)).numpy()
    if _BIG_ENDIAN:
        array = array.byteswap()
    if array.size == 0:
        return code, tuple(t.shape), memoryview(b"")
    flat: Any = array.reshape(-1)
    return code, tuple(t.shape), memoryview(flat).cast("B")


def tensor_to_proto(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encodes ``tensor`` (any device, any layout) into ``out`` (or a new message)."""
    code, shape, data = tensor_payload(tensor)
    msg = pb.Tensor() if out is None else out
    msg.dtype = code  # type: ignore[assignment]
    msg.shape.extend(shape)
    msg.data = data.tobytes()  # protobuf's bytes field needs an immutable bytes object: one copy
    return msg


def _checked_numel(shape: Sequence[int], field: str, itemsize: int) -> int:
    # The product of the non-zero dims is bounded too: an empty tensor of [0, C, 2^40, 2^40] has
    # no bytes, but its strides overflow int64 (torch refuses to allocate even its header).
    numel = extent = 1
    for i, dim in enumerate(shape):
        if dim < 0:
            raise TensorFormatError(f"{field}.shape[{i}]", f"dimension must be >= 0, got {dim}")
        numel *= dim
        extent *= dim or 1
        if extent * itemsize > MAX_TENSOR_BYTES:
            raise TensorFormatError(
                f"{field}.shape",
                f"{list(shape)} describes more than {MAX_TENSOR_BYTES} bytes"
                + (" (counting its non-zero dimensions)" if numel == 0 else ""),
            )
    return numel


def tensor_from_parts(code: int, shape: list[int], data: Any, field: str) -> torch.Tensor:
    """A CPU tensor viewing ``data`` (bytes or any buffer; no copy), after checking that dtype,
    shape and length agree. Raises ``TensorFormatError`` naming ``field`` otherwise."""
    dtype = DTYPE_FROM_PROTO.get(code)
    if dtype is None:
        name = pb.DType.Name(code) if code in pb.DType.values() else str(code)  # type: ignore[arg-type]
        raise TensorFormatError(
            f"{field}.dtype", f"unsupported dtype {name}; expected one of {_supported()}"
        )
    itemsize = _ITEMSIZE[code]
    numel = _checked_numel(shape, field, itemsize)
    expected = numel * itemsize
    if len(data) != expected:
        raise TensorFormatError(
            f"{field}.data",
            f"expected {expected} bytes (shape {shape} x {itemsize} bytes of "
            f"{dtype_name(dtype)}), got {len(data)}",
        )
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(data, dtype=dtype)
    if _BIG_ENDIAN:
        swapped = tensor.view(_SWAP_VIEW[itemsize]).numpy().byteswap()
        tensor = torch.from_numpy(swapped).view(dtype)
    return tensor.view(shape)


def tensor_from_proto(msg: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decodes a Tensor message into a CPU tensor viewing the message's bytes (no copy beyond the
    one protobuf makes on access; the hot paths use ``normserve.wire`` and skip even that)."""
    # one access of .data: each access of a bytes field builds a new bytes object
    return tensor_from_parts(msg.dtype, list(msg.shape), msg.data, field)
