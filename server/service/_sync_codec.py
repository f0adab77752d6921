"""A synchronized step's contributions and results as bytes, for a rendezvous outside this process.

Never pickle: a small header (magic, how many integers and tensors), the integers as int64, then
each 1-D tensor as its dtype code (float32, float64, or none) and length followed by its raw
little-endian values; ``frame`` adds a length and a CRC-32, so a truncated or altered copy is
refused (CorruptData), never read as wrong numbers. Values come back bit for bit.
"""

from __future__ import annotations

import struct

import torch

from normserve.server import ops
from normserve.server.service.stores._codec import CorruptData, frame, unframe

__all__ = ["pack", "pack_moments", "unpack", "unpack_moments"]

_MAGIC = b"NSg1"
_HEAD = struct.Struct("<4sBB")
_TENSOR = struct.Struct("<BI")
_DTYPES = {1: torch.float32, 2: torch.float64}
_CODES = {v: k for k, v in _DTYPES.items()}


def pack(ints: list[int], tensors: list[torch.Tensor | None]) -> bytes:
    """Integers and 1-D float32/float64 tensors (or None) as framed bytes (little-endian)."""
    parts = [_HEAD.pack(_MAGIC, len(ints), len(tensors)), struct.pack(f"<{len(ints)}q", *ints)]
    for t in tensors:
        if t is None:
            parts.append(_TENSOR.pack(0, 0))
            continue
        t = t.detach().to("cpu").contiguous().reshape(-1)
        parts.append(_TENSOR.pack(_CODES[t.dtype], t.numel()))
        parts.append(t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes())
    return frame(b"".join(parts))


def unpack(blob: bytes) -> tuple[list[int], list[torch.Tensor | None]]:
    """``pack``'s bytes back; CorruptData if they are not."""
    payload, end = unframe(blob)
    if end != len(blob):
        raise CorruptData(f"{len(blob) - end} unexpected bytes after the frame")
    try:
        magic, n_ints, n_tensors = _HEAD.unpack_from(payload, 0)
        if magic != _MAGIC:
            raise CorruptData(f"not a sync contribution (magic {magic!r})")
        at = _HEAD.size
        ints = list(struct.unpack_from(f"<{n_ints}q", payload, at))
        at += 8 * n_ints
        tensors: list[torch.Tensor | None] = []
        for _ in range(n_tensors):
            code, numel = _TENSOR.unpack_from(payload, at)
            at += _TENSOR.size
            if code == 0:
                tensors.append(None)
                continue
            dtype = _DTYPES.get(code)
            if dtype is None:
                raise CorruptData(f"unknown dtype code {code}")
            size = numel * (4 if dtype == torch.float32 else 8)
            if at + size > len(payload):
                raise CorruptData("truncated tensor")
            raw = bytearray(payload[at : at + size])
            tensors.append(
                torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
            )
            at += size
    except struct.error as err:
        raise CorruptData(f"truncated: {err}") from None
    if at != len(payload):
        raise CorruptData(f"{len(payload) - at} unexpected bytes")
    return ints, tensors


def pack_moments(m: ops.Moments | None, ints: list[int]) -> bytes:
    """Moments (count, mean, M2, pivot) or None, followed by ``ints``."""
    if m is None:
        return pack([-1, *ints], [])
    return pack([m.count, *ints], [m.mean.double(), m.m2.double(), m.pivot])


def unpack_moments(blob: bytes, device: torch.device) -> tuple[ops.Moments | None, list[int]]:
    ints, ts = unpack(blob)
    if not ints:
        raise CorruptData("no count")
    if ints[0] < 0:
        return None, ints[1:]
    if len(ts) != 3 or ts[0] is None or ts[1] is None:
        raise CorruptData("moments need a mean and an M2")
    pivot = None if ts[2] is None else ts[2].to(device)
    return ops.Moments(ints[0], ts[0].to(device), ts[1].to(device), pivot), ints[1:]
