"""The bytes a synchronized step's contributions and results travel as through Redis: bit for bit
back, and anything altered or truncated refused, never read as numbers."""

from __future__ import annotations

import pytest
import torch

from normserve.server import ops
from normserve.server.service._sync_codec import pack, pack_moments, unpack, unpack_moments
from normserve.server.service.stores._codec import CorruptData


def test_moments_come_back_bit_for_bit() -> None:
    for x in (torch.randn(5, 7, 3) * 1e4 + 3e6, torch.randn(9, 4, dtype=torch.float64)):
        m = ops.moments(x)
        back, ints = unpack_moments(pack_moments(m, [12, 2**62]), torch.device("cpu"))
        assert back is not None and ints == [12, 2**62]
        assert back.count == m.count
        assert torch.equal(back.mean, m.mean.double()) and torch.equal(back.m2, m.m2.double())
        assert m.pivot is not None and back.pivot is not None
        assert back.pivot.dtype == m.pivot.dtype and torch.equal(back.pivot, m.pivot)
    none, ints = unpack_moments(pack_moments(None, [0]), torch.device("cpu"))
    assert none is None and ints == [0]


def test_sums_and_empty_tensors() -> None:
    a, b = torch.randn(6), torch.empty(0)
    ints, ts = unpack(pack([-3, 0], [a, None, b]))
    assert ints == [-3, 0]
    assert ts[0] is not None and torch.equal(ts[0], a) and ts[1] is None
    assert ts[2] is not None and ts[2].numel() == 0


def test_altered_or_truncated_bytes_are_refused() -> None:
    blob = pack_moments(ops.moments(torch.randn(4, 3)), [4])
    flipped = bytearray(blob)
    flipped[-5] ^= 0x40
    for bad in (bytes(flipped), blob[:-3], blob + b"x", b"", b"NSv1"):
        with pytest.raises(CorruptData):
            unpack(bad)
    with pytest.raises(CorruptData):
        unpack_moments(pack([], []), torch.device("cpu"))
