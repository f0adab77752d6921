"""Regressions of the foundation issue, each through real gRPC: numerics and state on every path."""

from __future__ import annotations

import grpc
import pytest
import torch

from normserve import wire
from normserve.client import Client, FailedPreconditionError, InvalidArgumentError
from normserve.server import Server, Settings
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

from ._util import expect_status, raw_tensor, serving, settled, tensor, unchanged

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FINITE = (
    "contains NaN or Inf, or values whose statistics exceed float32's range "
    "(|mean| or variance > 3.4e38); nothing was applied"
)


def _session(client: Client, c: int, **kw: object) -> str:
    return client.create_session(c, **kw).session_id  # type: ignore[arg-type]


def _normalize(
    stub: pb_grpc.NormalizerStub, sid: str, t: pb.Tensor, **kw: object
) -> pb.NormalizeResponse:
    return stub.Normalize(pb.NormalizeRequest(session_id=sid, mode=pb.MODE_TRAIN, input=t, **kw))


def _stream(
    stub: pb_grpc.NormalizerStub, sid: str, chunks: list[torch.Tensor], mode: int = pb.MODE_TRAIN
) -> list[pb.NormalizeStreamResponse]:
    reqs = [
        pb.NormalizeStreamRequest(
            session_id=sid if i == 0 else "",
            mode=mode if i == 0 else 0,
            chunk=tensor(c),
            end_of_batch=i == len(chunks) - 1,
        )
        for i, c in enumerate(chunks)
    ]
    return list(stub.NormalizeStream(iter(reqs)))


# ---- 1. finite float64 input must not poison a session


@pytest.mark.parametrize(
    "x",
    [
        torch.tensor([[1e39], [2e39]], dtype=torch.float64),
        torch.tensor([[1e20], [-1e20], [1e20]], dtype=torch.float64),
    ],
    ids=["mean-beyond-float32", "variance-beyond-float32"],
)
def test_float64_statistics_beyond_float32_change_nothing(
    client: Client, stub: pb_grpc.NormalizerStub, x: torch.Tensor
) -> None:
    sid = _session(client, 1)
    with unchanged(client, sid):
        with expect_status(INVALID, f"input: {NOT_FINITE}"):
            _normalize(stub, sid, tensor(x))
        with expect_status(INVALID, f"input: {NOT_FINITE}"):
            _normalize(stub, sid, tensor(x), statistics_only=True)
        with expect_status(INVALID, f"chunk: {NOT_FINITE}"):
            _stream(stub, sid, [x[:1], x[1:]])
    # EVAL still gives finite outputs from the untouched running statistics
    out = client.normalize(sid, torch.randn(4, 1), mode="eval").output
    assert torch.isfinite(out).all()


def test_import_of_float64_beyond_float32_changes_nothing(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = _session(client, 2)
    big = torch.tensor([1e39, 0.0], dtype=torch.float64)
    for key in ("running_mean", "running_var", "weight", "bias"):
        with (
            unchanged(client, sid),
            expect_status(
                INVALID,
                f"entries[{key!r}]: contains NaN or Inf, or values beyond float32's range (|x| > 3.4e38)",
            ),
        ):
            stub.ImportState(
                pb.ImportStateRequest(
                    session_id=sid, entries=[pb.NamedTensor(name=key, tensor=tensor(big))]
                )
            )
    cfg = pb.SessionConfig(num_features=2, initial_weight=tensor(big))
    with expect_status(
        INVALID,
        "config.initial_weight: contains NaN or Inf, or values beyond float32's range (|x| > 3.4e38)",
    ):
        stub.CreateSession(pb.CreateSessionRequest(config=cfg))


# ---- 2. streamed outputs as accurate as unary ones


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "splits", [[64], [20, 44], [1, 7, 56]], ids=["1chunk", "2chunks", "3chunks"]
)
def test_streamed_outputs_are_as_accurate_as_unary(
    client: Client, stub: pb_grpc.NormalizerStub, dtype: torch.dtype, splits: list[int]
) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(64, 2, 16, generator=g, dtype=torch.float64) * 1e-2 + 1e4).to(dtype)
    xd = x.double()
    mean, var = xd.mean((0, 2), keepdim=True), xd.var((0, 2), unbiased=False, keepdim=True)
    ref = (xd - mean) / torch.sqrt(var + 1e-5)
    unary = client.normalize(_session(client, 2, affine=False), x).output
    answers = _stream(stub, _session(client, 2, affine=False), list(x.split(splits)))
    streamed = torch.cat([wire.tensor_from_proto(a.chunk) for a in answers])
    err_unary = (unary.double() - ref).abs().max().item()
    err_stream = (streamed.double() - ref).abs().max().item()
    # the float64 reference is itself good to ~1e-10 here (|mean| / std = 1e6)
    bound = 1e-6 if dtype == torch.float32 else 1e-9
    assert err_unary < bound and err_stream < bound, (err_unary, err_stream)
    assert err_stream <= 2 * err_unary + 1e-12


# ---- 3. the returned variance is exact whatever eps is


@pytest.mark.parametrize("std", [1e-4, 1e-3, 1e-1])
def test_returned_variance_is_exact_when_var_is_much_smaller_than_eps(
    client: Client, std: float
) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(256, 8, generator=g) * std
    sid = _session(client, 8, eps=1e-3)
    got = client.normalize(sid, x).var.double()
    want = x.double().var(0, unbiased=False)
    assert ((got - want).abs() / want).max().item() <= 1e-6


# ---- 4. the client's mistakes are INVALID_ARGUMENT, not INTERNAL


HUGE = [0, 2, 1 << 40, 1 << 40]
HUGE_MESSAGE = f"{HUGE} describes more than {1 << 40} bytes (counting its non-zero dimensions)"


def test_empty_tensor_with_huge_dims_is_invalid_everywhere(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = _session(client, 2)
    t = raw_tensor(pb.DTYPE_FLOAT32, HUGE, b"")
    with unchanged(client, sid):
        with expect_status(INVALID, f"input.shape: {HUGE_MESSAGE}"):
            _normalize(stub, sid, t)
        with expect_status(INVALID, f"chunk.shape: {HUGE_MESSAGE}"):
            list(
                stub.NormalizeStream(
                    iter(
                        [
                            pb.NormalizeStreamRequest(
                                session_id=sid, mode=pb.MODE_TRAIN, chunk=t, end_of_batch=True
                            )
                        ]
                    )
                )
            )
        with expect_status(INVALID, f"entries['running_mean'].tensor.shape: {HUGE_MESSAGE}"):
            stub.ImportState(
                pb.ImportStateRequest(
                    session_id=sid, entries=[pb.NamedTensor(name="running_mean", tensor=t)]
                )
            )
    with expect_status(INVALID, f"config.initial_weight.shape: {HUGE_MESSAGE}"):
        stub.CreateSession(
            pb.CreateSessionRequest(config=pb.SessionConfig(num_features=2, initial_weight=t))
        )


@pytest.mark.parametrize(
    "method",
    [
        "CreateSession",
        "GetSession",
        "ListSessions",
        "DeleteSession",
        "ResetSession",
        "ExportState",
        "ImportState",
    ],
)
def test_malformed_protobuf_is_invalid_argument_and_counted(server: Server, method: str) -> None:
    srv, registry = server, server.metrics.registry
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, a length past the end
    with grpc.insecure_channel(srv.address) as channel:
        call = channel.unary_unary(f"/normserve.v1.Normalizer/{method}")
        with pytest.raises(grpc.RpcError) as info:
            call(garbage, timeout=10)
    assert info.value.code() is INVALID
    assert info.value.details().startswith(
        f"request: not a valid normserve.v1.{method}Request message ("
    )
    assert (
        settled(registry, "normserve_requests_total", 1, method=method, code="INVALID_ARGUMENT")
        == 1
    )


# ---- 5. one session cannot break the server for everyone


def test_num_batches_tracked_cannot_overflow(client: Client) -> None:
    sid = _session(client, 2)
    top = (1 << 63) - 1
    with unchanged(client, sid), pytest.raises(InvalidArgumentError) as refused:
        client.import_state(sid, {"num_batches_tracked": torch.tensor(top)}, strict=False)
    assert refused.value.message == (
        f"entries['num_batches_tracked']: expected an int64 scalar in [0, {top})"
    )
    client.import_state(sid, {"num_batches_tracked": torch.tensor(top - 1)}, strict=False)
    client.normalize(sid, torch.randn(4, 2))  # the last count int64 holds
    with unchanged(client, sid), pytest.raises(FailedPreconditionError) as info:
        client.normalize(sid, torch.randn(4, 2))
    assert info.value.message == (
        f"session {sid!r}: num_batches_tracked would overflow int64; reset the session or "
        "import a smaller count"
    )
    # every read still works, the whole listing included
    assert client.get_session(sid).num_batches_tracked == top
    assert client.export_state(sid)["num_batches_tracked"].item() == top
    assert sid in [s.session_id for s in client.list_sessions()]


# ---- 6. refused before anything changes


def test_train_call_whose_answer_is_too_big_is_refused_before_it_is_applied(
    server: Server, client: Client
) -> None:
    c = 65536
    sid = _session(client, c)
    x = torch.randn(63, c)  # 16.5 MB in: under the 16 MiB limit with its header; the answer is not
    options = [
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    with grpc.insecure_channel(server.address, options=options) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        with (
            unchanged(client, sid),
            expect_status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer to this call (output [63, {c}] float32, {x.numel() * 4} bytes) would exceed "
                f"the server's message limit of {16 << 20} bytes; send the batch through "
                "NormalizeStream in smaller chunks; nothing was applied",
            ),
        ):
            _normalize(stub, sid, tensor(x))


def test_a_session_too_big_to_answer_is_never_created(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    limit = ((16 << 20) - 4096) // 16
    with expect_status(
        INVALID,
        f"config.num_features: must be between 1 and {limit} (this server's --max-features), "
        f"got {limit + 1}",
    ):
        stub.CreateSession(pb.CreateSessionRequest(config=pb.SessionConfig(num_features=limit + 1)))
    assert client.list_sessions() == []
    # the largest allowed session can be read and exported whole
    sid = _session(client, limit)
    assert client.get_session(sid).running_var.numel() == limit
    assert client.export_state(sid)["running_mean"].numel() == limit


# ---- 7. smaller ones


def test_empty_import_changes_nothing(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = _session(client, 2)
    with unchanged(client, sid):
        stub.ImportState(pb.ImportStateRequest(session_id=sid))


@pytest.mark.parametrize("eps", [1e39, 1e7, 0.0, 1e-40])
def test_eps_that_cannot_work_is_refused(stub: pb_grpc.NormalizerStub, eps: float) -> None:
    with expect_status(
        INVALID,
        f"config.eps: must be between 1.18e-38 (float32's smallest normal) and 1e+06, got {eps}",
    ):
        stub.CreateSession(
            pb.CreateSessionRequest(config=pb.SessionConfig(num_features=2, eps=eps))
        )


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4, 4), (2, 3, 0)])
def test_an_empty_train_batch_behaves_as_torch(
    client: Client, stub: pb_grpc.NormalizerStub, shape: tuple[int, ...]
) -> None:
    sid = _session(client, 3)
    client.normalize(
        sid, torch.randn(8, 3, *shape[2:]) if 0 not in shape[2:] else torch.randn(8, 3, 1)
    )
    before = client.get_session(sid)
    bn = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[len(shape)](3)
    bn.load_state_dict(client.export_state(sid))
    want = bn(torch.empty(shape))
    r = client.normalize(sid, torch.empty(shape))
    assert r.output.shape == want.shape
    after = client.get_session(sid)
    assert (
        after.num_batches_tracked == bn.num_batches_tracked.item() == before.num_batches_tracked + 1
    )
    assert torch.equal(after.running_mean, before.running_mean)
    assert torch.equal(after.running_var, before.running_var)
    # and through a stream: all chunks empty
    out = _stream(stub, sid, [torch.empty(0, *shape[1:]), torch.empty(0, *shape[1:])])
    assert [tuple(a.chunk.shape) for a in out] == [(0, *shape[1:])] * 2
    assert client.get_session(sid).num_batches_tracked == before.num_batches_tracked + 2


def test_a_stream_chunk_whose_answer_cannot_be_sent_changes_nothing() -> None:
    limit = 64 * 1024
    with serving(max_message_bytes=limit) as srv, Client(srv.address) as small:
        sid = small.create_session(64).session_id
        x = torch.randn(250, 64)  # 64,000 bytes: fits a request, not the answer with statistics
        with grpc.insecure_channel(srv.address) as channel, unchanged(small, sid):
            stub = pb_grpc.NormalizerStub(channel)
            with expect_status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer to this chunk (output [250, 64] float32, 64000 bytes) would exceed "
                f"the server's message limit of {limit} bytes; send the batch through "
                "NormalizeStream in smaller chunks; nothing was applied",
            ):
                _stream(stub, sid, [x])


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            Settings(max_features=1 << 20),
            "--max-features: at most 1048320 with --max-message-bytes 16777216 (a session of "
            "more could not be read or exported in one message)",
        ),
        (Settings(max_message_bytes=4096), "--max-message-bytes: must be >= 8192"),
    ],
)
def test_settings_that_would_make_unanswerable_sessions_are_refused(
    settings: Settings, message: str
) -> None:
    with pytest.raises(ValueError) as info:
        settings.validate()
    assert str(info.value) == message
