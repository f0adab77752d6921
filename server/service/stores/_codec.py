"""Session records and states as bytes, for the stores that keep them outside this process.

Never pickle: a state is a small JSON header (scalars, and each tensor's name, dtype and shape)
followed by the tensors' raw little-endian bytes; a record is JSON. A state's frozen flag,
calibration accumulator and adapted statistics are optional header keys and tensors, written only
when present: snapshots written before they existed load unchanged. ``frame`` wraps any payload
with a magic, its length and a CRC-32, so a truncated or corrupted copy is detected, never
loaded as wrong numbers.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict
from typing import Any

import torch

from normserve.server.service._config import Kind, SessionConfig
from normserve.server.service._state import Adapted, Calibration, SessionState
from normserve.server.service.stores._base import SessionRecord

__all__ = [
    "CorruptData",
    "decode_record",
    "decode_state",
    "encode_record",
    "encode_state",
    "frame",
    "unframe",
]

_TENSORS = ("running_mean", "running_var", "weight", "bias")
#: the optional tensors: a calibration's accumulator, the adapted statistics
_EXTRA = ("calibration.count", "calibration.mean", "calibration.m2", "adapted.mean", "adapted.var")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}
_HEAD = struct.Struct("<4sII")  # magic, payload length, CRC-32 of the payload
_MAGIC = b"NSv1"


class CorruptData(ValueError):
    """Bytes that are not what a store wrote: truncated, altered, or of another format."""


def frame(payload: bytes) -> bytes:
    return _HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def unframe(data: bytes | memoryview, offset: int = 0) -> tuple[bytes, int]:
    """The payload of the frame at ``offset`` and the offset after it; CorruptData if the frame
    is cut short or its checksum does not match."""
    if len(data) - offset < _HEAD.size:
        raise CorruptData(f"truncated frame header at byte {offset}")
    magic, length, crc = _HEAD.unpack_from(data, offset)
    if magic != _MAGIC:
        raise CorruptData(f"no frame at byte {offset} (magic {bytes(magic)!r})")
    start = offset + _HEAD.size
    payload = bytes(data[start : start + length])
    if len(payload) != length:
        raise CorruptData(f"frame at byte {offset} is truncated ({len(payload)} of {length} bytes)")
    if zlib.crc32(payload) != crc:
        raise CorruptData(f"frame at byte {offset} fails its checksum")
    return payload, start + length


def encode_state(state: SessionState) -> bytes:
    head: dict[str, Any] = {
        "version": state.version,
        "num_batches_tracked": state.num_batches_tracked,
        "update_time": state.update_time,
        "uid": state.uid,
        "tensors": [],
    }
    tensors: dict[str, torch.Tensor | None] = {name: getattr(state, name) for name in _TENSORS}
    if state.frozen:
        head["frozen"] = True
    c = state.calibration
    if c is not None:
        head["calibration"] = {"batches": c.batches, "samples": c.samples, "start": c.start_time}
        tensors |= {
            "calibration.count": c.count,
            "calibration.mean": c.mean,
            "calibration.m2": c.m2,
        }
    if state.adapted is not None:
        head["adapted"] = {"batches": state.adapted.batches}
        tensors |= {"adapted.mean": state.adapted.mean, "adapted.var": state.adapted.var}
    blobs = []
    for name, value in tensors.items():
        if value is None:
            continue
        cpu = value.detach().to("cpu").contiguous()
        head["tensors"].append([name, str(cpu.dtype)[6:], list(cpu.shape)])
        blobs.append(cpu.numpy().tobytes())
    header = json.dumps(head, separators=(",", ":")).encode()
    return struct.pack("<I", len(header)) + header + b"".join(blobs)


def decode_state(data: bytes) -> SessionState:
    try:
        (n,) = struct.unpack_from("<I", data)
        head = json.loads(data[4 : 4 + n])
        offset = 4 + n
        tensors: dict[str, torch.Tensor | None] = dict.fromkeys(_TENSORS + _EXTRA)
        for name, dtype, shape in head["tensors"]:
            if name not in tensors or dtype not in _DTYPES:
                raise CorruptData(f"unexpected tensor {name!r} of {dtype!r}")
            count = 1
            for d in shape:
                count *= int(d)
            size = count * _DTYPES[dtype].itemsize
            if offset + size > len(data):
                raise CorruptData(f"tensor {name!r} is truncated")
            t = (
                torch.frombuffer(bytearray(data[offset : offset + size]), dtype=_DTYPES[dtype])
                if size
                else torch.empty(0, dtype=_DTYPES[dtype])
            ).reshape(shape)
            tensors[name] = t
            offset += size
        if offset != len(data):
            raise CorruptData(f"{len(data) - offset} unexpected bytes after the tensors")
        extra = {name: tensors.pop(name) for name in _EXTRA}
        calibration = adapted = None
        if "calibration" in head:
            c = head["calibration"]
            counts, mean, m2 = (extra[f"calibration.{k}"] for k in ("count", "mean", "m2"))
            if counts is None or mean is None or m2 is None:
                raise CorruptData("a calibration without its tensors")
            calibration = Calibration(
                counts, mean, m2, int(c["batches"]), int(c["samples"]), float(c["start"])
            )
        if "adapted" in head:
            a_mean, a_var = extra["adapted.mean"], extra["adapted.var"]
            if a_mean is None or a_var is None:
                raise CorruptData("adapted statistics without their tensors")
            adapted = Adapted(a_mean, a_var, int(head["adapted"]["batches"]))
        return SessionState(
            version=int(head["version"]),
            num_batches_tracked=int(head["num_batches_tracked"]),
            update_time=float(head["update_time"]),
            uid=str(head.get("uid", "")),
            frozen=bool(head.get("frozen", False)),
            calibration=calibration,
            adapted=adapted,
            **tensors,  # type: ignore[arg-type]
        )
    except CorruptData:
        raise
    except (ValueError, KeyError, TypeError, struct.error, RuntimeError) as err:
        raise CorruptData(f"not a session state ({err})") from None


def encode_record(record: SessionRecord) -> bytes:
    cfg = asdict(record.config)
    cfg["kind"] = record.config.kind.value
    doc = {
        "config": cfg,
        "create_time": record.create_time,
        "uid": record.uid,
        "ttl_seconds": record.ttl_seconds,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_record(data: bytes) -> SessionRecord:
    try:
        doc = json.loads(data)
        cfg = dict(doc["config"])
        cfg["kind"] = Kind(cfg["kind"])
        return SessionRecord(
            config=SessionConfig(**cfg),
            create_time=float(doc["create_time"]),
            uid=str(doc["uid"]),
            ttl_seconds=float(doc.get("ttl_seconds", 0.0)),
        )
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptData(f"not a session record ({err})") from None
