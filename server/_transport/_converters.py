"""Conversions between normserve.v1 messages and the service's plain types, in one place."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import torch
from google.protobuf.timestamp_pb2 import Timestamp

from normserve import wire
from normserve.server.service import (
    Adaptation,
    Chunk,
    InvalidArgument,
    Kind,
    Mode,
    NormalizeCall,
    NormalizeResult,
    SessionConfig,
    SessionView,
    SyncReduced,
    SyncStep,
    check_session_id,
    shown,
)
from normserve.v1 import normserve_pb2 as pb
from normserve.wire import tensor_from_proto, tensor_to_proto

_KINDS_OUT = {
    Kind.BATCH_NORM: pb.NORM_KIND_BATCH_NORM,
    Kind.LAYER_NORM: pb.NORM_KIND_LAYER_NORM,
    Kind.GROUP_NORM: pb.NORM_KIND_GROUP_NORM,
    Kind.INSTANCE_NORM: pb.NORM_KIND_INSTANCE_NORM,
    Kind.RMS_NORM: pb.NORM_KIND_RMS_NORM,
    Kind.BATCH_RENORM: pb.NORM_KIND_BATCH_RENORM,
    Kind.GHOST_BATCH_NORM: pb.NORM_KIND_GHOST_BATCH_NORM,
    Kind.RECURRENT_BATCH_NORM: pb.NORM_KIND_RECURRENT_BATCH_NORM,
}
_KINDS = {pb.NORM_KIND_UNSPECIFIED: Kind.BATCH_NORM} | {v: k for k, v in _KINDS_OUT.items()}
_IMPLEMENTED = ", ".join(pb.NormKind.Name(v) for v in _KINDS_OUT.values())
_MODES: dict[int, Mode] = {
    pb.MODE_TRAIN: Mode.TRAIN,
    pb.MODE_EVAL: Mode.EVAL,
    pb.MODE_CALIBRATE: Mode.CALIBRATE,
}
#: What a state_dict key may look like: longer or stranger names are refused before any message
#: echoes them.
_KEY = re.compile(r"[A-Za-z0-9_.]{1,64}")


def mode(value: int, field: str = "mode") -> Mode:
    try:
        return _MODES[value]
    except KeyError:
        got = pb.Mode.Name(value) if value in pb.Mode.values() else str(value)
        raise InvalidArgument(
            field, f"expected MODE_TRAIN, MODE_EVAL or MODE_CALIBRATE, got {got}"
        ) from None


def config(msg: pb.SessionConfig) -> tuple[SessionConfig, torch.Tensor | None, torch.Tensor | None]:
    """A SessionConfig message -> (config, initial weight, initial bias)."""
    kind = _KINDS.get(msg.kind)
    if kind is None:
        got = pb.NormKind.Name(msg.kind) if msg.kind in pb.NormKind.values() else str(msg.kind)
        raise InvalidArgument(
            "config.kind", f"unsupported kind {got}; this server implements {_IMPLEMENTED}"
        )
    if len(msg.device) > 32:  # no device name is longer: refused before any message repeats it
        raise InvalidArgument(
            "config.device",
            f"unknown device {shown(msg.device, 32)}; expected auto, cpu, cuda or cuda:N",
        )
    # unset fields: torch's defaults for the kind (SessionConfig.of); momentum unset is torch's
    # momentum=None for every kind
    given: dict[str, object] = {"momentum": msg.momentum if msg.HasField("momentum") else None}
    for name in ("eps", "affine", "track_running_stats", "bias"):
        if msg.HasField(name):
            given[name] = getattr(msg, name)
    cfg = SessionConfig.of(
        kind,
        msg.num_features,
        allow_non_finite=msg.allow_non_finite,
        device=msg.device or "auto",
        ttl_seconds=msg.ttl_seconds if msg.HasField("ttl_seconds") else None,
        normalized_shape=tuple(msg.normalized_shape),
        num_groups=msg.num_groups,
        **_sync_config(msg),
        ghost_batch_size=msg.ghost_batch_size,
        time_steps=msg.time_steps,
        **given,
        **_renorm(msg),
    )
    weight = (
        tensor_from_proto(msg.initial_weight, "config.initial_weight")
        if msg.HasField("initial_weight")
        else None
    )
    bias = (
        tensor_from_proto(msg.initial_bias, "config.initial_bias")
        if msg.HasField("initial_bias")
        else None
    )
    return cfg, weight, bias


def _sync_config(msg: pb.SessionConfig) -> dict[str, object]:
    if not msg.HasField("sync"):
        return {}
    fields: dict[str, object] = {"sync_participants": msg.sync.participants}
    if msg.sync.HasField("timeout_seconds"):
        fields["sync_timeout"] = msg.sync.timeout_seconds
    if not msg.sync.participants:
        raise InvalidArgument("config.sync.participants", "must be between 2 and 4096, got 0")
    return fields


def _renorm(msg: pb.SessionConfig) -> dict[str, object]:
    """BatchRenormConfig's fields as SessionConfig's; unset limits keep the kind's defaults."""
    if not msg.HasField("renorm"):
        return {}
    if msg.kind != pb.NORM_KIND_BATCH_RENORM:
        raise InvalidArgument(
            "config.renorm", f"only batch renorm reads it, not {pb.NormKind.Name(msg.kind)}"
        )
    r = msg.renorm
    out: dict[str, object] = {
        "rmax_warmup_steps": r.rmax_warmup_steps,
        "dmax_warmup_steps": r.dmax_warmup_steps,
    }
    for name in ("rmax", "dmax"):
        if r.HasField(name):
            out[name] = getattr(r, name)
    return out


def _config_out(cfg: SessionConfig, ttl_seconds: float) -> pb.SessionConfig:
    msg = pb.SessionConfig(
        kind=_KINDS_OUT[cfg.kind],
        num_features=cfg.num_features,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
        device=cfg.device,
        allow_non_finite=cfg.allow_non_finite,
        ttl_seconds=ttl_seconds,
    )
    if cfg.momentum is not None:
        msg.momentum = cfg.momentum
    if cfg.eps is not None:  # RMS norm's unset eps stays unset: it depends on the input
        msg.eps = cfg.eps
    if cfg.bias is not None:
        msg.bias = cfg.bias
    msg.normalized_shape.extend(cfg.normalized_shape)
    msg.num_groups = cfg.num_groups
    if cfg.sync_participants:
        msg.sync.participants = cfg.sync_participants
        msg.sync.timeout_seconds = cfg.sync_timeout
    msg.ghost_batch_size = cfg.ghost_batch_size
    msg.time_steps = cfg.time_steps
    if cfg.rmax is not None and cfg.dmax is not None:
        msg.renorm.CopyFrom(
            pb.BatchRenormConfig(
                rmax=cfg.rmax,
                dmax=cfg.dmax,
                rmax_warmup_steps=cfg.rmax_warmup_steps,
                dmax_warmup_steps=cfg.dmax_warmup_steps,
            )
        )
    return msg


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def session(view: SessionView, with_tensors: bool = True) -> pb.Session:
    s, st = view.session, view.state
    msg = pb.Session(
        session_id=s.session_id,
        config=_config_out(s.config, s.ttl_seconds),
        device=str(s.device),
        version=st.version,
        num_batches_tracked=st.num_batches_tracked,
        create_time=_timestamp(s.create_time),
        update_time=_timestamp(st.update_time),
    )
    if view.expire_time is not None:
        msg.expire_time.CopyFrom(_timestamp(view.expire_time))
    if with_tensors:
        for name in ("running_mean", "running_var", "weight", "bias"):
            value = getattr(st, name)
            if value is not None:
                tensor_to_proto(value, getattr(msg, name))
    msg.frozen = st.frozen
    if st.calibration is not None:
        c = st.calibration
        msg.calibration.batches, msg.calibration.samples = c.batches, c.samples
        msg.calibration.start_time.CopyFrom(_timestamp(c.start_time))
    if st.adapted is not None:
        msg.adapted.batches = st.adapted.batches
        if with_tensors:
            tensor_to_proto(st.adapted.mean, msg.adapted.mean)
            tensor_to_proto(st.adapted.var, msg.adapted.var)
    return msg


def state_entries(entries: list[pb.NamedTensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i, entry in enumerate(entries):
        if not _KEY.fullmatch(entry.name):
            raise InvalidArgument(
                f"entries[{i}].name",
                f"not a state_dict key (1-64 characters of [A-Za-z0-9_.]): {shown(entry.name)}",
            )
        if entry.name in out:
            raise InvalidArgument(f"entries[{i}].name", f"duplicate key {entry.name!r}")
        out[entry.name] = tensor_from_proto(entry.tensor, f"entries[{entry.name!r}].tensor")
    return out


def export_response(state: dict[str, torch.Tensor], version: int) -> pb.ExportStateResponse:
    return pb.ExportStateResponse(
        entries=[pb.NamedTensor(name=k, tensor=tensor_to_proto(v)) for k, v in state.items()],
        version=version,
    )


def normalize_call(raw: bytes) -> NormalizeCall:
    """A NormalizeRequest's bytes -> the service's call (the tensor decoded on demand)."""
    req = wire.parse_normalize_request(raw)
    return NormalizeCall(
        req.session_id,
        lambda: mode(req.mode),
        req.tensor,
        req.statistics_only,
        len(raw),
        req.idempotency_key,
        None if req.sync is None else SyncStep(*req.sync),
        req.time_step,
        None if req.adaptation is None else Adaptation(*req.adaptation),
    )


def sync_step(msg: pb.SyncStep) -> SyncStep:
    return SyncStep(msg.rank, msg.step)


def sync_reduce_request(
    req: pb.SyncReduceRequest,
) -> tuple[str, SyncStep, torch.Tensor, torch.Tensor, int]:
    if not req.HasField("sync"):
        raise InvalidArgument("sync", "a SyncReduce call needs the rank and step it reduces")
    return (
        req.session_id,
        sync_step(req.sync),
        tensor_from_proto(req.sum_dy, "sum_dy"),
        tensor_from_proto(req.sum_dy_xhat, "sum_dy_xhat"),
        req.count,
    )


def sync_reduce_response(r: SyncReduced) -> pb.SyncReduceResponse:
    return pb.SyncReduceResponse(
        sum_dy=tensor_to_proto(r.sum_dy),
        sum_dy_xhat=tensor_to_proto(r.sum_dy_xhat),
        count=r.count,
        replayed=r.replayed,
    )


def normalize_response(r: NormalizeResult) -> bytes:
    """An encoded NormalizeResponse (one copy of the output, see normserve.wire)."""
    return wire.encode_normalize_response(
        r.output, r.mean, r.var, r.version, r.batch_statistics, r.replayed
    )


async def stream_chunks(requests: AsyncIterator[bytes]) -> AsyncIterator[tuple[Chunk, int]]:
    """NormalizeStreamRequest bytes -> the service's chunks, each with its size. A session id
    that a chunk names is checked here, so that no message ever echoes a malformed one."""
    async for raw in requests:
        req = wire.parse_stream_request(raw)
        if req.session_id:
            check_session_id(req.session_id)
        chunk = Chunk(
            req.session_id,
            req.mode,
            req.end_of_batch,
            req.statistics_only,
            req.tensor if req.has_tensor else None,
            mode,
            req.idempotency_key,
            req.time_step,
            None if req.sync is None else SyncStep(*req.sync),
            None if req.adaptation is None else Adaptation(*req.adaptation),
        )
        yield chunk, len(raw)


def stream_answer(
    batch_index: int, out: torch.Tensor | None, last: bool, head: NormalizeResult | None
) -> bytes:
    """One encoded NormalizeStreamResponse; ``head`` (statistics, version) on a batch's first."""
    if head is None:
        return wire.encode_stream_response(batch_index, out, last)
    return wire.encode_stream_response(
        batch_index,
        out,
        last,
        head.mean,
        head.var,
        head.version,
        head.batch_statistics,
        head.replayed,
    )
