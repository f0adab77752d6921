"""What the sync and asyncio clients share: result types, request building, the channel.

Both clients are thin shells over these functions, so they cannot drift apart. This module imports
no torch: the operator commands (``normserve health``, ``session list`` ...) and every session
method start in a fraction of the time torch's import takes. What handles tensors lives in
``_tensors`` and is imported on first use.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc
from grpc_health.v1 import health_pb2_grpc

from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    import torch

    from normserve.client._tensors import ArrayLike

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_MOMENTUM",
    "DEFAULT_TARGET",
    "ClientBase",
    "KindName",
    "ModeName",
    "NormalizeResult",
    "RenormLimits",
    "SessionInfo",
]

DEFAULT_TARGET = "127.0.0.1:50051"
#: Chunks of 1 MiB keep every message far below gRPC's 4 MiB default and serialize fastest.
DEFAULT_CHUNK_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

#: gRPC metadata: (key, value) pairs sent with a call.
Metadata = Sequence[tuple[str, str]] | None
ModeName = Literal["train", "eval", "calibrate"]
_MODES = {"train": pb.MODE_TRAIN, "eval": pb.MODE_EVAL, "calibrate": pb.MODE_CALIBRATE}
KindName = Literal[
    "batch_norm",
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "recurrent_batch_norm",
]
_KINDS: dict[str, int] = {
    "batch_norm": pb.NORM_KIND_BATCH_NORM,
    "layer_norm": pb.NORM_KIND_LAYER_NORM,
    "group_norm": pb.NORM_KIND_GROUP_NORM,
    "instance_norm": pb.NORM_KIND_INSTANCE_NORM,
    "rms_norm": pb.NORM_KIND_RMS_NORM,
    "batch_renorm": pb.NORM_KIND_BATCH_RENORM,
    "ghost_batch_norm": pb.NORM_KIND_GHOST_BATCH_NORM,
    "recurrent_batch_norm": pb.NORM_KIND_RECURRENT_BATCH_NORM,
}
_KIND_NAMES = {v: k for k, v in _KINDS.items()} | {pb.NORM_KIND_UNSPECIFIED: "batch_norm"}
#: The kinds that keep running statistics, and so read momentum.
_RUNNING_KINDS = (
    "batch_norm",
    "instance_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "recurrent_batch_norm",
)
#: torch's momentum, which create_session sends unless told otherwise.
DEFAULT_MOMENTUM = 0.1


@dataclass(frozen=True)
class RenormLimits:
    """Batch renorm's limits (``create_session(kind="batch_renorm", renorm=...)``): r is clipped
    to [1/rmax, rmax] and d to [-dmax, dmax]; each limit ramps linearly from 1 (rmax) and 0
    (dmax) over its warm-up, counted in the session's TRAIN batches (num_batches_tracked): the
    batch after t others uses 1 + (rmax - 1) * min(1, t / rmax_warmup_steps), and
    dmax * min(1, t / dmax_warmup_steps); a warm-up of 0 uses the limit at once."""

    rmax: float = 3.0
    dmax: float = 5.0
    rmax_warmup_steps: int = 0
    dmax_warmup_steps: int = 0


_TENSOR_FIELDS = ("running_mean", "running_var", "weight", "bias")
# little-endian numpy dtypes of the wire's dtype codes (bfloat16 is widened by hand: numpy has none)
_NUMPY_DTYPES = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT16: "<f2", pb.DTYPE_FLOAT64: "<f8"}


def tensor_values(msg: pb.Tensor) -> list[Any]:
    """A Tensor message's values as (nested) Python lists, without torch: for JSON and printing."""
    import numpy as np

    data = msg.data
    if msg.dtype == pb.DTYPE_BFLOAT16:
        array = (np.frombuffer(data, "<u2").astype("<u4") << 16).view("<f4")
    elif msg.dtype == pb.DTYPE_INT64:
        array = np.frombuffer(data, "<i8")
    else:
        array = np.frombuffer(data, _NUMPY_DTYPES.get(msg.dtype, "<f4"))
    values: list[Any] = array.reshape(list(msg.shape)).tolist()
    return values


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server reported it. ``running_mean``, ``running_var``, ``weight`` and
    ``bias`` are CPU tensors, or None when absent or not asked for; they are decoded on first use
    (so code that reads only the config never imports torch)."""

    session_id: str
    num_features: int
    #: None: RMS norm's torch default (the machine epsilon of the computation's dtype)
    eps: float | None
    momentum: float | None
    affine: bool
    track_running_stats: bool
    allow_non_finite: bool
    device: str
    version: int
    num_batches_tracked: int
    create_time: dt.datetime
    update_time: dt.datetime
    #: idle seconds after which the session expires (0: never), and when it will if unused
    ttl_seconds: float = 0.0
    expire_time: dt.datetime | None = None
    #: "batch_norm", "layer_norm", "group_norm", "instance_norm" or "rms_norm"
    kind: str = "batch_norm"
    #: layer and RMS norm: the normalized trailing dims
    normalized_shape: tuple[int, ...] = ()
    #: group norm: the number of groups
    num_groups: int = 0
    #: layer norm: whether it has a bias beside its weight (None for the other kinds)
    has_bias: bool | None = None
    #: a synchronized batch norm session's participants (0: not synchronized) and step timeout
    sync_participants: int = 0
    sync_timeout: float | None = None
    #: batch renorm: its limits and their warm-up (None for the other kinds)
    renorm: RenormLimits | None = None
    #: ghost batch norm: the size of its virtual batches (0 for the other kinds)
    ghost_batch_size: int = 0
    #: recurrent batch norm: its time-step slots (0 for the other kinds)
    time_steps: int = 0
    #: frozen: the server refuses every change of state until it is unfrozen
    frozen: bool = False
    #: a recalibration in progress: since when (None: none), its batches and samples so far
    calibration_start: dt.datetime | None = None
    calibration_batches: int = 0
    calibration_samples: int = 0
    #: adapting batches folded into the adapted statistics (None: the session has none)
    adapted_batches: int | None = None
    _wire: Mapping[str, pb.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _decoded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    def _tensor(self, name: str) -> torch.Tensor | None:
        msg = self._wire.get(name)
        if msg is None:
            return None
        if name not in self._decoded:
            from normserve.wire import tensor_from_proto

            self._decoded[name] = tensor_from_proto(msg, name).clone()
        return self._decoded[name]

    @property
    def running_mean(self) -> torch.Tensor | None:
        return self._tensor("running_mean")

    @property
    def running_var(self) -> torch.Tensor | None:
        return self._tensor("running_var")

    @property
    def weight(self) -> torch.Tensor | None:
        return self._tensor("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self._tensor("bias")

    @property
    def calibrating(self) -> bool:
        return self.calibration_start is not None

    @property
    def adapted_mean(self) -> torch.Tensor | None:
        """The adapted statistics (None: none, or tensors not asked for)."""
        return self._tensor("adapted_mean")

    @property
    def adapted_var(self) -> torch.Tensor | None:
        return self._tensor("adapted_var")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (tensors as lists of numbers; absent ones as null)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            if isinstance(value, dt.datetime):
                value = value.isoformat()
            elif isinstance(value, RenormLimits):
                value = asdict(value)
            out[key] = value
        for name in (*_TENSOR_FIELDS, "adapted_mean", "adapted_var"):
            msg = self._wire.get(name)
            out[name] = None if msg is None else tensor_values(msg)
        out["calibrating"] = self.calibrating
        return out


@dataclass(frozen=True)
class NormalizeResult:
    """One normalized batch: ``output`` (same type, shape, dtype and device as the input; None with
    statistics_only), the per-channel ``mean``/``var`` used, and the session ``version`` after it."""

    output: Any
    mean: torch.Tensor
    var: torch.Tensor
    version: int
    batch_statistics: bool
    #: the call had been applied before (a retry): this is its answer, nothing was applied again
    replayed: bool = False


@dataclass(frozen=True)
class SyncReduced:
    """A synchronized step's backward sums over the group (float32 [C]) and its values per
    channel."""

    sum_dy: torch.Tensor
    sum_dy_xhat: torch.Tensor
    count: int
    replayed: bool = False


def sync_reduce_request(
    session_id: str,
    sync: tuple[int, int],
    sum_dy: ArrayLike,
    sum_dy_xhat: ArrayLike,
    count: int,
) -> pb.SyncReduceRequest:
    from normserve.client._tensors import as_tensor
    from normserve.wire import tensor_to_proto

    req = pb.SyncReduceRequest(
        session_id=session_id, sync=pb.SyncStep(rank=sync[0], step=sync[1]), count=count
    )
    tensor_to_proto(as_tensor(sum_dy).detach().float().cpu(), req.sum_dy)
    tensor_to_proto(as_tensor(sum_dy_xhat).detach().float().cpu(), req.sum_dy_xhat)
    return req


def sync_reduced(msg: pb.SyncReduceResponse) -> SyncReduced:
    from normserve.wire import tensor_from_proto

    return SyncReduced(
        tensor_from_proto(msg.sum_dy, "sum_dy").clone(),
        tensor_from_proto(msg.sum_dy_xhat, "sum_dy_xhat").clone(),
        msg.count,
        msg.replayed,
    )


#: Status codes a call is tried again on: the server could not be reached, did not answer in time,
#: or lost a race with other processes (ABORTED). Every call may be: TRAIN calls carry an
#: idempotency key, so a retry is applied once.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}
)


@dataclass(frozen=True)
class RetryPolicy:
    """How calls that fail with UNAVAILABLE or DEADLINE_EXCEEDED are tried again: within the
    call's timeout (the deadline covers every try, as gRPC's own retries do) and at most
    ``seconds`` (0: never retry), waiting between tries from ``initial_backoff`` doubling up to
    ``max_backoff`` seconds, with full jitter so that clients that failed together do not return
    together. ``attempt_timeout`` bounds each try (None: the rest of the call's timeout), so a
    server that hangs is tried again (DEADLINE_EXCEEDED) while the call's deadline allows."""

    seconds: float = 60.0
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    attempt_timeout: float | None = None

    def start(self, timeout: float | None) -> Retrier:
        return Retrier(self, timeout)


class Retrier:
    """One call's tries under a ``RetryPolicy`` and the call's ``timeout``."""

    def __init__(self, policy: RetryPolicy, timeout: float | None) -> None:
        now = time.monotonic()
        self.policy = policy
        self.deadline = None if timeout is None else now + timeout
        budget = now + policy.seconds
        self.retry_until = budget if self.deadline is None else min(budget, self.deadline)
        self.attempts = 0
        self.failed: grpc.StatusCode | None = None  # the last retryable failure

    def timeout(self) -> float | None:
        """This try's timeout: what is left of the call's, at most the policy's per try."""
        left = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
        per_try = self.policy.attempt_timeout
        if per_try is None:
            return left
        return per_try if left is None else min(per_try, left)

    def delay(self, code: grpc.StatusCode | None) -> float | None:
        """Seconds to wait before the next try after a failure with ``code``; None: give up."""
        self.attempts += 1
        if code not in RETRYABLE or self.policy.seconds <= 0:
            return None
        cap = min(self.policy.max_backoff, self.policy.initial_backoff * 2 ** (self.attempts - 1))
        wait = random.uniform(0, cap)
        if time.monotonic() + wait >= self.retry_until:
            return None
        self.failed = code
        return wait


def new_idempotency_key() -> str:
    return uuid.uuid4().hex


def mode_value(mode: ModeName | str) -> int:
    try:
        return _MODES[str(mode).lower()]
    except KeyError:
        raise ValueError(f"mode must be 'train', 'eval' or 'calibrate', got {mode!r}") from None


def resolve_mode(mode: ModeName | None, adapt: float | None) -> ModeName:
    """A normalize call's mode: as given; unset, "eval" for an adapting call, else "train"."""
    if mode is None:
        return "train" if adapt is None else "eval"
    return mode


def adaptation(adapt: float | None, accumulate: bool) -> tuple[float, bool] | None:
    """A call's adaptation (batch weight, accumulate), or None for a plain call; accumulating
    without a weight is refused here, before anything is sent (it would be a plain call, and in
    TRAIN mode move the running statistics)."""
    if adapt is None:
        if accumulate:
            raise ValueError(
                "adapt_accumulate=True needs adapt= (the batch's weight in the mix, in [0, 1]): "
                "without it the call is a plain normalization, and in TRAIN mode it would move "
                "the running statistics"
            )
        return None
    return float(adapt), accumulate


def normalize_key(
    mode: ModeName | str, adapt: float | None, accumulate: bool, idempotency_key: str | None
) -> str:
    """The idempotency key of a call that changes state (TRAIN, CALIBRATE, an accumulating
    adaptation): the caller's, or a fresh one; "" for a call that changes nothing."""
    value = mode_value(mode)
    if value in (pb.MODE_TRAIN, pb.MODE_CALIBRATE) or (adapt is not None and accumulate):
        return idempotency_key or new_idempotency_key()
    return ""


#: the session methods without arguments: (RPC name, its request message)
CHANGES: dict[str, tuple[str, Any]] = {
    "start_calibration": ("StartCalibration", pb.StartCalibrationRequest),
    "commit_calibration": ("CommitCalibration", pb.CommitCalibrationRequest),
    "abort_calibration": ("AbortCalibration", pb.AbortCalibrationRequest),
    "freeze": ("FreezeSession", pb.FreezeSessionRequest),
    "unfreeze": ("UnfreezeSession", pb.UnfreezeSessionRequest),
    "reset_adaptation": ("ResetAdaptation", pb.ResetAdaptationRequest),
    "promote_adaptation": ("PromoteAdaptation", pb.PromoteAdaptationRequest),
}


def session_info(msg: pb.Session) -> SessionInfo:
    cfg = msg.config
    return SessionInfo(
        session_id=msg.session_id,
        num_features=cfg.num_features,
        eps=cfg.eps if cfg.HasField("eps") else None,
        momentum=cfg.momentum if cfg.HasField("momentum") else None,
        affine=cfg.affine,
        track_running_stats=cfg.track_running_stats,
        allow_non_finite=cfg.allow_non_finite,
        device=msg.device,
        version=msg.version,
        num_batches_tracked=msg.num_batches_tracked,
        create_time=msg.create_time.ToDatetime(dt.UTC),
        update_time=msg.update_time.ToDatetime(dt.UTC),
        ttl_seconds=cfg.ttl_seconds,
        expire_time=msg.expire_time.ToDatetime(dt.UTC) if msg.HasField("expire_time") else None,
        kind=_KIND_NAMES.get(cfg.kind, str(cfg.kind)),
        normalized_shape=tuple(cfg.normalized_shape),
        num_groups=cfg.num_groups,
        has_bias=cfg.bias if cfg.HasField("bias") else None,
        sync_participants=cfg.sync.participants,
        sync_timeout=cfg.sync.timeout_seconds if cfg.HasField("sync") else None,
        renorm=RenormLimits(
            cfg.renorm.rmax,
            cfg.renorm.dmax,
            cfg.renorm.rmax_warmup_steps,
            cfg.renorm.dmax_warmup_steps,
        )
        if cfg.HasField("renorm")
        else None,
        ghost_batch_size=cfg.ghost_batch_size,
        time_steps=cfg.time_steps,
        frozen=msg.frozen,
        calibration_start=msg.calibration.start_time.ToDatetime(dt.UTC)
        if msg.HasField("calibration")
        else None,
        calibration_batches=msg.calibration.batches,
        calibration_samples=msg.calibration.samples,
        adapted_batches=msg.adapted.batches if msg.HasField("adapted") else None,
        _wire=_session_tensors(msg),
    )


def _session_tensors(msg: pb.Session) -> dict[str, pb.Tensor]:
    out = {name: getattr(msg, name) for name in _TENSOR_FIELDS if msg.HasField(name)}
    if msg.HasField("adapted"):
        for name in ("mean", "var"):
            if msg.adapted.HasField(name):
                out[f"adapted_{name}"] = getattr(msg.adapted, name)
    return out


def kind_value(kind: KindName | str) -> int:
    try:
        return _KINDS[str(kind).lower()]
    except KeyError:
        raise ValueError(f"kind must be one of {', '.join(_KINDS)}; got {kind!r}") from None


def create_request(
    num_features: int,
    *,
    session_id: str = "",
    eps: float | None = None,
    momentum: float | None = DEFAULT_MOMENTUM,
    affine: bool | None = None,
    track_running_stats: bool | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    device: str = "",
    allow_non_finite: bool = False,
    ttl_seconds: float | None = None,
    kind: KindName | str = "batch_norm",
    normalized_shape: int | Sequence[int] | None = None,
    num_groups: int = 0,
    has_bias: bool | None = None,
    sync_participants: int = 0,
    sync_timeout: float | None = None,
    renorm: RenormLimits | None = None,
    ghost_batch_size: int = 0,
    time_steps: int = 0,
) -> pb.CreateSessionRequest:
    """The request for ``create_session`` (see there). None leaves a field unset: the server
    reads it as torch's default for the kind."""
    cfg = pb.SessionConfig(
        kind=kind_value(kind),  # type: ignore[arg-type]
        num_features=num_features,
        device=device,
        allow_non_finite=allow_non_finite,
        num_groups=num_groups,
        ghost_batch_size=ghost_batch_size,
        time_steps=time_steps,
    )
    if renorm is not None:
        cfg.renorm.CopyFrom(
            pb.BatchRenormConfig(
                rmax=renorm.rmax,
                dmax=renorm.dmax,
                rmax_warmup_steps=renorm.rmax_warmup_steps,
                dmax_warmup_steps=renorm.dmax_warmup_steps,
            )
        )
    if eps is not None:
        cfg.eps = eps
    if affine is not None:
        cfg.affine = affine
    if track_running_stats is not None:
        cfg.track_running_stats = track_running_stats
    if has_bias is not None:
        cfg.bias = has_bias
    if normalized_shape is not None:
        dims = [normalized_shape] if isinstance(normalized_shape, int) else normalized_shape
        cfg.normalized_shape.extend(int(d) for d in dims)
    # torch's default momentum means nothing to a kind without running statistics; anything
    # else is sent, for the server to refuse
    if momentum is not None and (
        str(kind).lower() in _RUNNING_KINDS or momentum != DEFAULT_MOMENTUM
    ):
        cfg.momentum = momentum
    if ttl_seconds is not None:
        cfg.ttl_seconds = ttl_seconds
    if sync_participants:
        cfg.sync.participants = sync_participants
        if sync_timeout is not None:
            cfg.sync.timeout_seconds = sync_timeout
    if weight is not None or bias is not None:
        from normserve.client._tensors import as_tensor
        from normserve.wire import tensor_to_proto

        if weight is not None:
            tensor_to_proto(as_tensor(weight).float(), cfg.initial_weight)
        if bias is not None:
            tensor_to_proto(as_tensor(bias).float(), cfg.initial_bias)
    return pb.CreateSessionRequest(session_id=session_id, config=cfg)


NORMALIZE = "/normserve.v1.Normalizer/Normalize"
NORMALIZE_STREAM = "/normserve.v1.Normalizer/NormalizeStream"


def service_config(load_balancing: str = "", retry: bool = True) -> str:
    """The channel's service config: gRPC's own retry of UNAVAILABLE (quick, transparent: a
    connection reset, a replica going away), under the client's longer ``RetryPolicy``; and the
    load-balancing policy (``round_robin`` spreads calls over every address a name resolves to,
    e.g. a Kubernetes headless Service's pods). Without ``retry`` (a client with ``retry=0``, the
    CLI) gRPC does not retry either: one call, one try."""
    config: dict[str, Any] = {}
    if retry:
        config["methodConfig"] = [
            {
                "name": [{"service": "normserve.v1.Normalizer"}],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    if load_balancing:
        config["loadBalancingConfig"] = [{load_balancing: {}}]
    return json.dumps(config)


def channel_options(
    max_message_bytes: int,
    extra: Sequence[tuple[str, Any]] = (),
    load_balancing: str = "",
    retry: bool = True,
) -> list[Any]:
    if load_balancing not in ("", "pick_first", "round_robin"):
        raise ValueError(
            f"load_balancing must be 'pick_first' or 'round_robin', got {load_balancing!r}"
        )
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.service_config", service_config(load_balancing, retry)),
        # a restarted server is found within a second, not after grpc's default backoff (which
        # grows to two minutes)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        *extra,
    ]


_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_KEY = b"PRIVATE KEY-----"


def _read_pem(what: str, path: str) -> bytes:
    """A PEM file's bytes; ``what`` says which ("CA file", "certificate file", "key file")."""
    marker, kind = (
        (_PEM_KEY, "private key") if what == "key file" else (_PEM_CERTIFICATE, "certificate")
    )
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise ValueError(f"cannot read the {what} {path}: {err.strerror or err}") from None
    if marker not in data:
        raise ValueError(f"the {what} {path} holds no PEM {kind}")
    return data


def check_token(token: str) -> str:
    """The token, stripped; raises ``ValueError`` (never quoting it) unless gRPC can send it."""
    token = token.strip()
    if not token:
        raise ValueError("the token is empty")
    if any(not 0x21 <= ord(ch) <= 0x7E for ch in token):
        raise ValueError(
            "the token has a character gRPC metadata cannot carry (printable ASCII only, no "
            "spaces or line breaks)"
        )
    return token


def connection_security(
    *,
    tls: bool = False,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    token: str | None = None,
    credentials: grpc.ChannelCredentials | None = None,
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """The channel credentials for these options (``None``: plaintext), and the metadata every
    call must carry besides: the token, where the channel cannot carry it as call credentials."""
    if bool(cert_file) != bool(key_file):
        missing = "key_file (--key-file)" if cert_file else "cert_file (--cert-file)"
        raise ValueError(f"a client certificate goes with its key: {missing} is missing")
    wants_tls = bool(tls or ca_file or cert_file)
    if credentials is not None and wants_tls:
        raise ValueError("give either credentials or tls/ca_file/cert_file/key_file, not both")
    if wants_tls:
        credentials = grpc.ssl_channel_credentials(
            # no CA file: the system's root certificates
            root_certificates=_read_pem("CA file", ca_file) if ca_file else None,
            private_key=_read_pem("key file", key_file) if key_file else None,
            certificate_chain=_read_pem("certificate file", cert_file) if cert_file else None,
        )
    if token is None:
        return credentials, ()
    token = check_token(token)
    if credentials is None:
        # grpc sends call credentials over secure channels only; over plaintext (a loopback
        # server, or one behind a proxy that terminates TLS) the token goes as plain metadata
        return None, (("authorization", f"Bearer {token}"),)
    call = grpc.access_token_call_credentials(token)
    return grpc.composite_channel_credentials(credentials, call), ()


class ClientBase:
    """What the sync and asyncio clients share: options, the channel's stubs, metadata.
    Subclasses say how to open the channel (``grpc`` or ``grpc.aio``).

    Security: ``tls=True`` uses TLS with the system's root certificates, ``ca_file`` (a PEM file,
    implies TLS) with those instead; ``cert_file`` and ``key_file`` present a client certificate
    (mutual TLS). ``token`` is sent as ``authorization: Bearer TOKEN`` with every call.
    ``credentials`` (any ``grpc.ChannelCredentials``) replaces the TLS options.

    Retries: a call that fails with UNAVAILABLE or DEADLINE_EXCEEDED is tried again within its
    timeout, under ``retry`` (a ``RetryPolicy``, or its budget in seconds; 0 turns retries off).
    TRAIN calls carry an idempotency key, the same on every try, so a retried update is applied
    once. Streams of many batches are not retried (their batches carry keys, so resending them
    is safe). ``load_balancing="round_robin"`` spreads calls over every address the target
    resolves to (``dns:///normserve-headless:50051`` for a Kubernetes headless Service)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
        metadata: Metadata = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
        retry: RetryPolicy | float | None = None,
        load_balancing: str = "",
    ) -> None:
        self.target = target
        if retry is None:
            retry = RetryPolicy()
        self.retry = retry if isinstance(retry, RetryPolicy) else RetryPolicy(float(retry))
        self.metadata = tuple(metadata or ())
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        #: what one message may carry (the channel's send and receive limits)
        self.max_message_bytes = max_message_bytes
        credentials, self._auth_metadata = connection_security(
            tls=tls,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            token=token,
            credentials=credentials,
        )
        self._channel: Any = self._open(
            target,
            credentials,
            channel_options(max_message_bytes, options, load_balancing, self.retry.seconds > 0),
        )
        self._stub = pb_grpc.NormalizerStub(self._channel)
        # the tensor-carrying methods move raw bytes, encoded by normserve.wire (zero-copy reads)
        self._normalize = self._channel.unary_unary(NORMALIZE, _registered_method=True)
        self._normalize_stream = self._channel.stream_stream(
            NORMALIZE_STREAM, _registered_method=True
        )
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _open(self, target: str, credentials: grpc.ChannelCredentials | None, options: Any) -> Any:
        raise NotImplementedError

    def _metadata(self, extra: Metadata) -> tuple[tuple[str, str], ...] | None:
        """The client's metadata plus the call's (e.g. an ``x-request-id``)."""
        merged = self._auth_metadata + self.metadata + tuple(extra or ())
        return merged or None
