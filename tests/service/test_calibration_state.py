"""The frozen flag, a calibration's accumulator and adapted statistics are session state: every
store keeps them exactly (the local store across a reopen, Redis across processes), and
snapshots written before they existed still load."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from normserve.server.service._config import SessionConfig
from normserve.server.service._state import Adapted, Calibration, SessionState
from normserve.server.service.stores import MemoryStore, SessionRecord
from normserve.server.service.stores._codec import (
    CorruptData,
    decode_state,
    encode_state,
)
from normserve.server.service.stores._local import LocalStore
from normserve.server.service.stores._redis import RedisStore
from tests._redis import RedisServer

T, C = 3, 5


def _record(uid: str) -> SessionRecord:
    return SessionRecord(SessionConfig(C, momentum=0.1), 1000.0, uid, 0.0)


def _plain(uid: str) -> SessionState:
    return SessionState(1, 4, torch.randn(T, C), torch.rand(T, C), torch.randn(C), None, 7.5, uid)


def _full(uid: str) -> SessionState:
    calibration = Calibration(
        count=torch.tensor([12, 0, 7]),
        mean=torch.randn(T, C, dtype=torch.float64),
        m2=torch.rand(T, C, dtype=torch.float64),
        batches=3,
        samples=19,
        start_time=1234.5,
    )
    adapted = Adapted(torch.randn(T, C), torch.rand(T, C), 9)
    return _plain(uid).advanced(frozen=True, calibration=calibration, adapted=adapted)


def _same(a: SessionState, b: SessionState) -> None:
    assert (a.version, a.num_batches_tracked, a.uid, a.frozen) == (
        b.version,
        b.num_batches_tracked,
        b.uid,
        b.frozen,
    )
    for name in ("running_mean", "running_var", "weight", "bias"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name
    assert (a.calibration is None) == (b.calibration is None)
    if a.calibration is not None and b.calibration is not None:
        ca, cb = a.calibration, b.calibration
        assert (ca.batches, ca.samples, ca.start_time) == (cb.batches, cb.samples, cb.start_time)
        for t in ("count", "mean", "m2"):
            x, y = getattr(ca, t), getattr(cb, t)
            assert x.dtype == y.dtype and torch.equal(x, y), t
    assert (a.adapted is None) == (b.adapted is None)
    if a.adapted is not None and b.adapted is not None:
        assert a.adapted.batches == b.adapted.batches
        assert torch.equal(a.adapted.mean, b.adapted.mean)
        assert torch.equal(a.adapted.var, b.adapted.var)


def test_the_codec_round_trips_the_new_state_exactly() -> None:
    for s in (_full("u"), _plain("u")):
        _same(decode_state(encode_state(s)), s)


def test_a_snapshot_from_before_the_new_state_loads_with_its_defaults() -> None:
    """The bytes the codec wrote before frozen/calibration/adapted existed, built by hand."""
    mean, var = torch.arange(C, dtype=torch.float32), torch.full((C,), 2.0)
    head = {
        "version": 3,
        "num_batches_tracked": 2,
        "update_time": 5.0,
        "uid": "old",
        "tensors": [["running_mean", "float32", [C]], ["running_var", "float32", [C]]],
    }
    header = json.dumps(head, separators=(",", ":")).encode()
    old = struct.pack("<I", len(header)) + header + mean.numpy().tobytes() + var.numpy().tobytes()
    s = decode_state(old)
    assert (s.version, s.frozen, s.calibration, s.adapted) == (3, False, None, None)
    assert torch.equal(s.running_mean, mean) and torch.equal(s.running_var, var)
    # and a state without the new parts is still written exactly as before
    assert encode_state(s) == old


def test_a_calibration_without_its_tensors_is_corrupt() -> None:
    raw = encode_state(_plain("u"))
    (n,) = struct.unpack_from("<I", raw)
    head = json.loads(raw[4 : 4 + n])
    head["calibration"] = {"batches": 1, "samples": 2, "start": 0.0}
    header = json.dumps(head, separators=(",", ":")).encode()
    with pytest.raises(CorruptData, match="a calibration without its tensors"):
        decode_state(struct.pack("<I", len(header)) + header + raw[4 + n :])


def test_the_memory_store_keeps_the_state_as_committed() -> None:
    store = MemoryStore()
    store.create("s", _record("u"), _plain("u"))
    full = _full("u")
    store.commit("s", full, 1)
    _same(store.read("s"), full)


@pytest.mark.parametrize("durability", ["interval", "strict"])
def test_the_local_store_keeps_it_across_a_reopen(tmp_path: Path, durability: str) -> None:
    stores: list[LocalStore] = []
    try:
        store = LocalStore(tmp_path / "state", durability, 3600.0)
        stores.append(store)
        store.create("s", _record("u"), _plain("u"))
        full = _full("u")
        ticket = store.commit("s", full, 1)
        if ticket is not None:
            ticket.result(timeout=10)
        store.close()
        store = LocalStore(tmp_path / "state", durability, 3600.0)
        stores.append(store)
        _same(store.read("s"), full)
    finally:
        for s in stores:
            s._abandon()


@pytest.fixture
def redis_stores(redis_server: RedisServer) -> Iterator[tuple[RedisStore, RedisStore]]:
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    yield a, b
    a.close()
    b.close()


def test_a_second_redis_store_reads_what_the_first_committed(
    redis_stores: tuple[RedisStore, RedisStore],
) -> None:
    a, b = redis_stores
    a.create("s", _record("u"), _plain("u"))
    full = _full("u")
    a.commit("s", full, 1)
    _same(b.read("s"), full)
    loaded = b.load("s")
    assert loaded is not None
    _same(loaded[1], full)
