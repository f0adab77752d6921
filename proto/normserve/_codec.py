"""The wire format's Python face: torch tensors to and from ``normserve.v1.Tensor`` messages.

Shared by the client and the server so both sides agree byte for byte: raw little-endian bytes in C
order, with shape and dtype. Decoding is zero-copy (``torch.frombuffer`` over the received bytes).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence

import torch

from normserve.v1 import normserve_pb2 as pb

__all__ = [
    "DTYPE_FROM_PROTO",
    "DTYPE_TO_PROTO",
    "MAX_TENSOR_BYTES",
    "TensorFormatError",
    "dtype_name",
    "tensor_from_proto",
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
    return ", ".join(pb.DType.Name(v) for v in DTYPE_FROM_PROTO)


def tensor_to_proto(tensor: torch.Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encodes ``tensor`` (any device, any layout) into ``out`` (or a new message)."""
    try:
        code = DTYPE_TO_PROTO[tensor.dtype]
    except KeyError:
        raise TypeError(
            f"unsupported dtype {dtype_name(tensor.dtype)}; expected one of "
            "float32, float16, bfloat16, float64, int64"
        ) from None
    msg = pb.Tensor() if out is None else out
    msg.dtype = code  # type: ignore[assignment]
    msg.shape[:] = tensor.shape
    flat = tensor.detach().reshape(-1)
    if flat.device.type != "cpu":
        flat = flat.cpu()
    if _BIG_ENDIAN:
        flat = flat.view(_SWAP_VIEW[flat.element_size()]).numpy().byteswap()  # type: ignore[assignment]
        msg.data = flat.tobytes()  # type: ignore[attr-defined]
        return msg
    msg.data = flat.contiguous().view(torch.uint8).numpy().tobytes()
    return msg


def _checked_numel(shape: Sequence[int], field: str, itemsize: int) -> int:
    numel = 1
    for i, dim in enumerate(shape):
        if dim < 0:
            raise TensorFormatError(f"{field}.shape[{i}]", f"dimension must be >= 0, got {dim}")
        numel *= dim
        if numel * itemsize > MAX_TENSOR_BYTES:
            raise TensorFormatError(
                f"{field}.shape",
                f"{list(shape)} describes more than {MAX_TENSOR_BYTES} bytes",
            )
    return numel


def tensor_from_proto(msg: pb.Tensor, field: str = "tensor") -> torch.Tensor:
    """Decodes a Tensor message into a CPU tensor viewing the message's bytes (no copy).

    Raises ``TensorFormatError`` naming ``field`` for an unsupported dtype, a negative or overflowing
    dimension, or a data length that does not match shape x itemsize.
    """
    dtype = DTYPE_FROM_PROTO.get(msg.dtype)
    if dtype is None:
        name = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
        raise TensorFormatError(
            f"{field}.dtype", f"unsupported dtype {name}; expected one of {_supported()}"
        )
    shape = list(msg.shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = _checked_numel(shape, field, itemsize)
    data = msg.data  # one access: each access of a bytes field builds a new bytes object
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
