"""Every bad input: its exact status and message, the session untouched, the server alive."""

from __future__ import annotations

import struct

import grpc
import pytest
import torch

from normserve.client import Client
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

from ._util import expect_status, raw_tensor, tensor, unchanged

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def sid(client: Client) -> str:
    info = client.create_session(4, session_id="victim")
    client.normalize(info.session_id, torch.randn(8, 4) + 3)  # non-trivial state to protect
    return info.session_id


def _normalize(stub: pb_grpc.NormalizerStub, sid: str, t: pb.Tensor, mode: int = pb.MODE_TRAIN):
    return stub.Normalize(pb.NormalizeRequest(session_id=sid, mode=mode, input=t))


def test_unknown_session_is_not_found(stub: pb_grpc.NormalizerStub) -> None:
    msg = "session 'ghost' not found"
    for call, req in [
        (stub.GetSession, pb.GetSessionRequest(session_id="ghost")),
        (stub.DeleteSession, pb.DeleteSessionRequest(session_id="ghost")),
        (stub.ResetSession, pb.ResetSessionRequest(session_id="ghost")),
        (stub.ExportState, pb.ExportStateRequest(session_id="ghost")),
        (stub.ImportState, pb.ImportStateRequest(session_id="ghost")),
        (stub.Normalize, pb.NormalizeRequest(session_id="ghost", mode=pb.MODE_TRAIN)),
    ]:
        with expect_status(grpc.StatusCode.NOT_FOUND, msg):
            call(req)


def test_duplicate_id_is_already_exists(
    client: Client, stub: pb_grpc.NormalizerStub, sid: str
) -> None:
    req = pb.CreateSessionRequest(session_id=sid, config=pb.SessionConfig(num_features=9))
    with (
        unchanged(client, sid),
        expect_status(grpc.StatusCode.ALREADY_EXISTS, "session 'victim' already exists"),
    ):
        stub.CreateSession(req)
    assert client.get_session(sid).num_features == 4


CASES = [
    pytest.param(
        tensor(torch.randn(8, 3)),
        pb.MODE_TRAIN,
        "input.shape[1]: expected 4 channels (num_features), got 3",
        id="wrong-channels",
    ),
    pytest.param(
        tensor(torch.randn(8)),
        pb.MODE_TRAIN,
        "input.shape: expected rank 2 to 5 ([N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]), "
        "got rank 1 [8]",
        id="rank-1",
    ),
    pytest.param(
        tensor(torch.randn(2, 4, 1, 1, 1, 2)),
        pb.MODE_EVAL,
        "input.shape: expected rank 2 to 5 ([N, C], [N, C, L], [N, C, H, W] or [N, C, D, H, W]), "
        "got rank 6 [2, 4, 1, 1, 1, 2]",
        id="rank-6",
    ),
    pytest.param(
        raw_tensor(pb.DTYPE_FLOAT32, [8, 4], b"\0" * 100),
        pb.MODE_TRAIN,
        "input.data: expected 128 bytes (shape [8, 4] x 4 bytes of float32), got 100",
        id="data-length",
    ),
    pytest.param(
        raw_tensor(pb.DTYPE_FLOAT32, [-2, 4], b""),
        pb.MODE_TRAIN,
        "input.shape[0]: dimension must be >= 0, got -2",
        id="negative-dim",
    ),
    pytest.param(
        raw_tensor(pb.DTYPE_FLOAT32, [1 << 40, 4, 1 << 20], b""),
        pb.MODE_TRAIN,
        f"input.shape: {[1 << 40, 4, 1 << 20]} describes more than {1 << 40} bytes",
        id="overflowing-dims",
    ),
    pytest.param(
        raw_tensor(pb.DTYPE_UNSPECIFIED, [2, 4], b"\0" * 32),
        pb.MODE_TRAIN,
        "input.dtype: unsupported dtype DTYPE_UNSPECIFIED; expected one of DTYPE_FLOAT32, "
        "DTYPE_FLOAT16, DTYPE_BFLOAT16, DTYPE_FLOAT64 (DTYPE_INT64 only for num_batches_tracked)",
        id="dtype-unspecified",
    ),
    pytest.param(
        raw_tensor(42, [2, 4], b"\0" * 32),
        pb.MODE_TRAIN,
        "input.dtype: unsupported dtype 42; expected one of DTYPE_FLOAT32, DTYPE_FLOAT16, "
        "DTYPE_BFLOAT16, DTYPE_FLOAT64 (DTYPE_INT64 only for num_batches_tracked)",
        id="dtype-unknown",
    ),
    pytest.param(
        tensor(torch.ones(2, 4, dtype=torch.int64)),
        pb.MODE_TRAIN,
        "input.dtype: expected float32, float16, bfloat16 or float64, got int64",
        id="dtype-int64",
    ),
    pytest.param(
        tensor(torch.tensor([[1.0, 2, 3, 4], [float("nan"), 1, 1, 1]])),
        pb.MODE_TRAIN,
        "input: contains NaN or Inf, or values whose statistics exceed float32's range "
        "(|mean| or variance > 3.4e38); nothing was applied",
        id="nan-train",
    ),
    pytest.param(
        tensor(torch.tensor([[1.0, 2, 3, 4], [float("inf"), 1, 1, 1]])),
        pb.MODE_EVAL,
        "input: contains NaN or Inf; nothing was applied",
        id="inf-eval",
    ),
    pytest.param(
        tensor(torch.randn(1, 4)),
        pb.MODE_TRAIN,
        "input.shape: batch statistics need more than 1 value per channel, got input size [1, 4]",
        id="one-value-per-channel",
    ),
    pytest.param(
        tensor(torch.randn(1, 4, 1, 1)),
        pb.MODE_TRAIN,
        "input.shape: batch statistics need more than 1 value per channel, "
        "got input size [1, 4, 1, 1]",
        id="one-value-per-channel-2d",
    ),
    pytest.param(
        tensor(torch.randn(3, 4)),
        pb.MODE_UNSPECIFIED,
        "mode: expected MODE_TRAIN, MODE_EVAL or MODE_CALIBRATE, got MODE_UNSPECIFIED",
        id="mode-unspecified",
    ),
]


@pytest.mark.parametrize(("t", "mode", "message"), CASES)
def test_bad_input_is_invalid_argument_and_changes_nothing(
    client: Client, stub: pb_grpc.NormalizerStub, sid: str, t: pb.Tensor, mode: int, message: str
) -> None:
    with unchanged(client, sid), expect_status(INVALID, message):
        _normalize(stub, sid, t, mode)
    # The server is alive and the session still works.
    assert client.normalize(sid, torch.randn(4, 4), mode="eval").output.shape == (4, 4)


def test_float16_data_length_counts_two_bytes(stub: pb_grpc.NormalizerStub, sid: str) -> None:
    with expect_status(
        INVALID, "input.data: expected 16 bytes (shape [2, 4] x 2 bytes of float16), got 32"
    ):
        _normalize(stub, sid, raw_tensor(pb.DTYPE_FLOAT16, [2, 4], struct.pack("8f", *range(8))))


@pytest.mark.parametrize(
    ("config", "code", "message"),
    [
        (
            pb.SessionConfig(num_features=0),
            INVALID,
            "config.num_features: must be between 1 and 1048320 (this server's --max-features), got 0",
        ),
        (
            pb.SessionConfig(num_features=3, eps=-1),
            INVALID,
            "config.eps: must be between 1.18e-38 (float32's smallest normal) and 1e+06, got -1.0",
        ),
        (
            pb.SessionConfig(num_features=3, momentum=0),
            INVALID,
            "config.momentum: must be in (0, 1], or unset for a cumulative average; got 0.0",
        ),
        (
            pb.SessionConfig(num_features=3, kind=99),  # type: ignore[arg-type]
            INVALID,
            "config.kind: unsupported kind 99; this server implements NORM_KIND_BATCH_NORM, "
            "NORM_KIND_LAYER_NORM, NORM_KIND_GROUP_NORM, NORM_KIND_INSTANCE_NORM, "
            "NORM_KIND_RMS_NORM, NORM_KIND_BATCH_RENORM, NORM_KIND_GHOST_BATCH_NORM, "
            "NORM_KIND_RECURRENT_BATCH_NORM",
        ),
        (
            pb.SessionConfig(num_features=3, device="gpu0"),
            INVALID,
            "config.device: unknown device 'gpu0'; expected auto, cpu, cuda or cuda:N",
        ),
        (
            pb.SessionConfig(num_features=3, initial_weight=tensor(torch.ones(2))),
            INVALID,
            "config.initial_weight: expected shape [3], got [2]",
        ),
        (
            pb.SessionConfig(num_features=3, affine=False, initial_bias=tensor(torch.ones(3))),
            INVALID,
            "config.initial_weight: needs affine=true",
        ),
    ],
)
def test_bad_config(
    client: Client,
    stub: pb_grpc.NormalizerStub,
    config: pb.SessionConfig,
    code: grpc.StatusCode,
    message: str,
) -> None:
    with expect_status(code, message):
        stub.CreateSession(pb.CreateSessionRequest(session_id="new", config=config))
    assert [s.session_id for s in client.list_sessions()] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_cuda_on_cpu_server_is_failed_precondition(stub: pb_grpc.NormalizerStub) -> None:
    cfg = pb.SessionConfig(num_features=3, device="cuda:1")
    with expect_status(
        grpc.StatusCode.FAILED_PRECONDITION,
        "config.device: 'cuda:1' requested, but this server has no CUDA",
    ):
        stub.CreateSession(pb.CreateSessionRequest(config=cfg))


def test_bad_session_id(stub: pb_grpc.NormalizerStub) -> None:
    with expect_status(
        INVALID, "session_id: must be 1-128 characters of [A-Za-z0-9._-], not . or .., got 'a b'"
    ):
        stub.CreateSession(
            pb.CreateSessionRequest(session_id="a b", config=pb.SessionConfig(num_features=2))
        )
    with expect_status(INVALID, "session_id: must not be empty"):
        stub.Normalize(pb.NormalizeRequest(mode=pb.MODE_TRAIN))


@pytest.mark.parametrize(
    ("entries", "strict", "message"),
    [
        (
            [("running_mean", torch.zeros(5))],
            False,
            "entries['running_mean']: expected shape [4], got [5]",
        ),
        (
            [("running_var", torch.tensor([1.0, -1, 1, 1]))],
            False,
            "entries['running_var']: variances must be >= 0",
        ),
        (
            [("running_mean", torch.tensor([0.0, float("nan"), 0, 0]))],
            False,
            "entries['running_mean']: contains NaN or Inf, or values beyond float32's range "
            "(|x| > 3.4e38)",
        ),
        (
            [("num_batches_tracked", torch.tensor(-3))],
            False,
            "entries['num_batches_tracked']: expected an int64 scalar in [0, 9223372036854775807)",
        ),
        (
            [("gamma", torch.ones(4))],
            False,
            "entries['gamma']: unexpected key; this session's state_dict keys are "
            "['weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked']",
        ),
        (
            [("running_mean", torch.zeros(4))],
            True,
            "entries: missing keys ['weight', 'bias', 'running_var', 'num_batches_tracked'] "
            "(strict import)",
        ),
        (
            [("running_mean", torch.zeros(4)), ("running_mean", torch.zeros(4))],
            False,
            "entries[1].name: duplicate key 'running_mean'",
        ),
    ],
)
def test_bad_import_changes_nothing(
    client: Client,
    stub: pb_grpc.NormalizerStub,
    sid: str,
    entries: list,
    strict: bool,
    message: str,
) -> None:
    req = pb.ImportStateRequest(
        session_id=sid,
        entries=[pb.NamedTensor(name=k, tensor=tensor(v)) for k, v in entries],
        strict=strict,
    )
    with unchanged(client, sid), expect_status(INVALID, message):
        stub.ImportState(req)


def test_bad_page_token(stub: pb_grpc.NormalizerStub) -> None:
    with expect_status(INVALID, "page_token: not a token this server issued"):
        stub.ListSessions(pb.ListSessionsRequest(page_token="nonsense"))
