"""Layer, group, instance and RMS norm sessions over gRPC against their torch modules: unary and
streamed batches, TRAIN and EVAL, the statistics answered, state export and import, and every
validation error with its exact message."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normserve.client import Client, ResourceExhaustedError
from normserve.server import Server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from tests.grpc._util import expect_status, serving, tensor, unchanged

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server for the module (stopping one costs ~0.5 s; these tests are many, and each
    works in sessions of its own)."""
    with serving(workers=16) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[pb_grpc.NormalizerStub]:
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.NormalizerStub(channel)
    channel.close()


INVALID = grpc.StatusCode.INVALID_ARGUMENT
INSTANCE = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}


@dataclass
class Case:
    """One config: the torch module, the session's create_session arguments, and the input's
    shape after its batch dim."""

    kind: str
    module: nn.Module
    session: dict[str, Any]
    tail: list[int]

    def statistics(self, x: torch.Tensor, batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics the answer must carry, from a float64 reference."""
        x64, m = x.double(), self.module
        if self.kind in ("layer_norm", "rms_norm"):
            dims = list(range(x.dim() - len(m.normalized_shape), x.dim()))
            if self.kind == "rms_norm":
                ms = x64.square().mean(dim=dims)
                return torch.zeros_like(ms), ms
            return x64.mean(dim=dims), x64.var(dim=dims, unbiased=False)
        if self.kind == "instance_norm" and not batch:
            return m.running_mean.double(), m.running_var.double()
        groups = m.num_groups if self.kind == "group_norm" else x.shape[1]
        flat = x64.reshape(x.shape[0], groups, -1)
        return flat.mean(dim=2), flat.var(dim=2, unbiased=False)


def _case(
    kind: str,
    g: torch.Generator,
    *,
    normalized: list[int] | None = None,
    lead: list[int] | None = None,
    channels: int = 4,
    groups: int = 2,
    spatial: list[int] | None = None,
    eps: float | None = 1e-5,
    momentum: float | None = 0.1,
    affine: bool = True,
    bias: bool = True,
    track: bool = False,
) -> Case:
    spatial = [6] if spatial is None else spatial
    if kind == "layer_norm":
        shape = normalized or [8]
        module: nn.Module = nn.LayerNorm(shape, eps=eps, elementwise_affine=affine, bias=bias)  # type: ignore[arg-type]
        session = {"num_features": 0, "normalized_shape": shape, "eps": eps, "has_bias": bias}
        tail = [*(lead or []), *shape]
    elif kind == "rms_norm":
        shape = normalized or [8]
        module = nn.RMSNorm(shape, eps=eps, elementwise_affine=affine)
        session = {"num_features": 0, "normalized_shape": shape, "eps": eps}
        tail = [*(lead or []), *shape]
    elif kind == "group_norm":
        module = nn.GroupNorm(groups, channels, eps=eps, affine=affine)  # type: ignore[arg-type]
        session = {"num_features": channels, "num_groups": groups, "eps": eps}
        tail = [channels, *spatial]
    else:
        module = INSTANCE[len(spatial) + 2](
            channels,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track,  # type: ignore[arg-type]
        )
        session = {"num_features": channels, "eps": eps, "momentum": momentum}
        session["track_running_stats"] = track
        tail = [channels, *spatial]
    session["affine"] = affine
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(
                torch.rand(p.shape, generator=g) + 0.5
                if name == "weight"
                else torch.randn(p.shape, generator=g)
            )
            session["weight" if name == "weight" else "bias"] = p.detach().clone()
    return Case(kind, module, {"kind": kind, **session}, tail)


def _input(case: Case, g: torch.Generator, n: int) -> torch.Tensor:
    # well conditioned (see tests/ops/test_norm_kinds.py): every statistic covers >= 8 values
    return torch.randn([n, *case.tail], generator=g) * 2 + float(torch.randn(1, generator=g)) * 3


def _check_calls(
    client: Client, case: Case, modes: list[str], g: torch.Generator, sizes: Iterator[int]
) -> str:
    """Runs ``modes`` through a new session of ``case`` and the torch module side by side;
    returns the session id."""
    sid = client.create_session(**case.session).session_id
    ref = case.module
    for mode in modes:
        x = _input(case, g, next(sizes))
        ref.train(mode == "train")
        batch = mode == "train" or not getattr(ref, "track_running_stats", False)
        mean, var = case.statistics(x, batch)  # before the call: EVAL uses the running ones
        with torch.no_grad():
            expected = ref(x)
        got = client.normalize(sid, x, mode=mode)  # type: ignore[arg-type]
        torch.testing.assert_close(got.output, expected, **TOL)
        assert got.batch_statistics is batch
        assert got.mean.dtype == torch.float32 and got.mean.shape == mean.shape
        torch.testing.assert_close(got.mean.double(), mean, **TOL)
        torch.testing.assert_close(got.var.double(), var, **TOL)
    state = client.export_state(sid)
    assert list(state) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(state[key], value, **TOL)
    return sid


def _sizes(g: torch.Generator) -> Iterator[int]:
    while True:
        yield int(torch.randint(1, 6, (1,), generator=g))


CASES: list[tuple[str, dict[str, Any]]] = [
    ("layer_norm", {"normalized": [8]}),
    ("layer_norm", {"normalized": [3, 4], "lead": [2]}),
    ("layer_norm", {"normalized": [2, 5], "bias": False}),
    ("layer_norm", {"normalized": [9], "affine": False, "eps": 0.1}),
    ("rms_norm", {"normalized": [8]}),
    ("rms_norm", {"normalized": [2, 4], "lead": [3], "eps": None}),
    ("rms_norm", {"normalized": [10], "affine": False, "eps": 1e-3}),
    ("group_norm", {"channels": 6, "groups": 3, "spatial": [4]}),
    ("group_norm", {"channels": 8, "groups": 2, "spatial": []}),
    ("group_norm", {"channels": 4, "groups": 4, "spatial": [3, 3], "affine": False}),
    ("group_norm", {"channels": 3, "groups": 1, "spatial": [2, 2, 2]}),
    ("instance_norm", {"spatial": [8]}),
    ("instance_norm", {"spatial": [3, 3], "affine": True, "track": True, "momentum": 0.3}),
    ("instance_norm", {"spatial": [2, 2, 2], "track": True, "momentum": None}),
    ("instance_norm", {"spatial": [9], "affine": True}),
]
MODES = ["train", "eval", "train", "train", "eval"]


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_unary_and_streamed_calls_match_torch(
    server: Server, client: Client, kind: str, options: dict[str, Any]
) -> None:
    g = torch.Generator().manual_seed(len(kind) + len(str(options)))
    _check_calls(client, _case(kind, g, **options), MODES, g, _sizes(g))
    # the same calls, every batch streamed a row or so per chunk
    g = torch.Generator().manual_seed(len(kind) + len(str(options)))
    with Client(server.address, chunk_bytes=64) as streaming:
        sizes = iter([4, 5, 3, 2, 5])
        _check_calls(streaming, _case(kind, g, **options), MODES, g, sizes)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["layer_norm", "group_norm", "instance_norm", "rms_norm"]))
    options: dict[str, Any] = {
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1] + ([None] if kind == "rms_norm" else []))),
        "affine": draw(st.booleans()),
    }
    if kind in ("layer_norm", "rms_norm"):
        normalized = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        if math.prod(normalized) < 8:
            normalized = [*normalized, 8]
        options["normalized"] = normalized
        options["lead"] = draw(st.lists(st.integers(1, 3), max_size=2))
        if kind == "layer_norm":
            options["bias"] = draw(st.booleans())
    else:
        rank = draw(st.sampled_from([3, 4, 5]) if kind == "instance_norm" else st.integers(2, 5))
        spatial = draw(st.lists(st.integers(1, 3), min_size=rank - 2, max_size=rank - 2))
        groups = draw(st.integers(1, 3))
        per_group = draw(st.integers(1, 3))
        per_stat = (per_group if kind == "group_norm" else 1) * math.prod(spatial)
        if per_stat < 8:
            spatial = [*spatial[:-1], spatial[-1] * -(-8 // per_stat)] if spatial else [8]
        options["spatial"] = spatial
        options["channels"] = groups * per_group
        options["groups"] = groups
        if kind == "instance_norm":
            options["track"] = draw(st.booleans())
            options["momentum"] = draw(st.one_of(st.none(), st.floats(0.01, 1.0)))
    return {
        "kind": kind,
        "options": options,
        "modes": draw(st.lists(st.sampled_from(["train", "eval"]), min_size=3, max_size=6)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=30, deadline=None)
@given(sc=scenarios())
def test_random_configs_and_shapes_match_torch(client: Client, sc: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(sc["seed"])
    sid = _check_calls(client, _case(sc["kind"], g, **sc["options"]), sc["modes"], g, _sizes(g))
    client.delete_session(sid)


def test_many_batches_on_one_stream(server: Server) -> None:
    g = torch.Generator().manual_seed(5)
    case = _case("instance_norm", g, spatial=[5], affine=True, track=True, momentum=0.2)
    batches = [_input(case, g, n) for n in (3, 1, 4, 2)]
    with Client(server.address, chunk_bytes=100) as client:
        sid = client.create_session(**case.session).session_id
        results = list(client.normalize_stream(sid, batches, mode="train"))
        assert [r.version for r in results] == [2, 3, 4, 5]
        case.module.train()
        for x, r in zip(batches, results, strict=True):
            mean, var = case.statistics(x, True)
            with torch.no_grad():
                torch.testing.assert_close(r.output, case.module(x), **TOL)
            torch.testing.assert_close(r.mean.double(), mean, **TOL)
            torch.testing.assert_close(r.var.double(), var, **TOL)
        info = client.get_session(sid)
        torch.testing.assert_close(info.running_mean, case.module.running_mean, **TOL)
        torch.testing.assert_close(info.running_var, case.module.running_var, **TOL)
        assert info.num_batches_tracked == 0  # torch's InstanceNorm never counts


def test_statistics_only(client: Client) -> None:
    g = torch.Generator().manual_seed(6)
    case = _case("layer_norm", g, normalized=[4, 4], lead=[3])
    sid = client.create_session(**case.session).session_id
    x = _input(case, g, 5)
    got = client.normalize(sid, x, mode="eval", statistics_only=True)
    assert got.output is None
    mean, var = case.statistics(x, True)
    torch.testing.assert_close(got.mean.double(), mean, **TOL)
    torch.testing.assert_close(got.var.double(), var, **TOL)


# ---- state: export to and import from torch modules


@pytest.mark.parametrize(("kind", "options"), CASES)
def test_state_round_trips_through_torch_modules(
    client: Client, kind: str, options: dict[str, Any]
) -> None:
    g = torch.Generator().manual_seed(7)
    case = _case(kind, g, **options)
    sid = client.create_session(**case.session).session_id
    # export -> torch: a fresh module of the same config loads it, strict
    fresh = _case(kind, torch.Generator().manual_seed(8), **options).module
    fresh.load_state_dict(client.export_state(sid), strict=True)
    for key, value in case.module.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # torch -> import: a module that has trained (running statistics moved), then EVAL agrees
    trained = case.module
    trained.train()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.25)
        for _ in range(3):
            trained(_input(case, g, 3))
    info = client.import_state(sid, trained.state_dict(), strict=True)
    assert info.version == (2 if trained.state_dict() else 1)  # nothing kept, nothing changed
    for key, value in client.export_state(sid).items():
        assert torch.equal(value, trained.state_dict()[key]), key
    trained.eval()
    x = _input(case, g, 4)
    with torch.no_grad():
        torch.testing.assert_close(client.normalize(sid, x, mode="eval").output, trained(x), **TOL)


def test_reset_puts_instance_running_statistics_back(client: Client) -> None:
    sid = client.create_session(3, kind="instance_norm", track_running_stats=True).session_id
    client.normalize(sid, torch.randn(2, 3, 5) + 4)
    assert float(client.get_session(sid).running_mean.abs().min()) > 0.1  # type: ignore[union-attr]
    info = client.reset_session(sid)
    assert torch.equal(info.running_mean, torch.zeros(3))  # type: ignore[arg-type]
    assert torch.equal(info.running_var, torch.ones(3))  # type: ignore[arg-type]


def test_session_shows_its_kind_and_torchs_defaults(client: Client) -> None:
    layer = client.create_session(0, kind="layer_norm", normalized_shape=[2, 3])
    assert (layer.kind, layer.num_features, layer.normalized_shape) == ("layer_norm", 6, (2, 3))
    assert (layer.eps, layer.affine, layer.has_bias, layer.track_running_stats) == (
        1e-5,
        True,
        True,
        False,
    )
    assert layer.momentum is None and layer.weight is not None and layer.weight.shape == (2, 3)
    rms = client.create_session(0, kind="rms_norm", normalized_shape=4)
    assert (rms.eps, rms.has_bias, rms.bias) == (None, None, None)  # torch's eps=None
    group = client.create_session(6, kind="group_norm", num_groups=3)
    assert (group.num_groups, group.affine, group.track_running_stats) == (3, True, False)
    inst = client.create_session(5, kind="instance_norm")
    assert (inst.affine, inst.track_running_stats, inst.momentum) == (False, False, 0.1)
    assert client.export_state(inst.session_id) == {}
    batch = client.create_session(5)
    assert (batch.kind, batch.eps, batch.affine, batch.track_running_stats) == (
        "batch_norm",
        1e-5,
        True,
        True,
    )


# ---- validation: every error, with its exact message


def _config(kind: int, **fields: Any) -> pb.SessionConfig:
    return pb.SessionConfig(kind=kind, **fields)  # type: ignore[arg-type]


LAYER, GROUP, INST, RMS, BATCH = (
    pb.NORM_KIND_LAYER_NORM,
    pb.NORM_KIND_GROUP_NORM,
    pb.NORM_KIND_INSTANCE_NORM,
    pb.NORM_KIND_RMS_NORM,
    pb.NORM_KIND_BATCH_NORM,
)
CONFIG_ERRORS = [
    (
        _config(LAYER),
        "config.normalized_shape: layer norm needs the trailing dims it normalizes, got none",
    ),
    (
        _config(RMS, num_features=4),
        "config.normalized_shape: RMS norm needs the trailing dims it normalizes, got none",
    ),
    (_config(LAYER, normalized_shape=[3, 0]), "config.normalized_shape[1]: must be > 0, got 0"),
    (_config(RMS, normalized_shape=[-2]), "config.normalized_shape[0]: must be > 0, got -2"),
    (
        _config(LAYER, normalized_shape=[1] * 17),
        "config.normalized_shape: at most 16 dims, got 17",
    ),
    (
        _config(LAYER, num_features=5, normalized_shape=[2, 3]),
        "config.num_features: layer norm normalizes 6 values (the product of normalized_shape "
        "[2, 3]); leave num_features 0 or give that, got 5",
    ),
    (
        _config(LAYER, normalized_shape=[4], momentum=0.1),
        "config.momentum: layer norm keeps no running statistics (only batch and instance norm "
        "do); leave it unset",
    ),
    (
        _config(GROUP, num_features=4, num_groups=2, track_running_stats=True),
        "config.track_running_stats: group norm keeps no running statistics (only batch and "
        "instance norm do); leave it unset or false",
    ),
    (
        _config(BATCH, num_features=4, num_groups=2),
        "config.num_groups: only group norm reads it, not batch norm",
    ),
    (
        _config(INST, num_features=4, normalized_shape=[4]),
        "config.normalized_shape: only layer and RMS norm read it; instance norm normalizes over "
        "fixed dims",
    ),
    (
        _config(LAYER, normalized_shape=[4], num_groups=2),
        "config.num_groups: only group norm reads it, not layer norm",
    ),
    (
        _config(GROUP, num_features=4),
        "config.num_groups: group norm needs num_groups > 0, got 0",
    ),
    (
        _config(GROUP, num_features=4, num_groups=-2),
        "config.num_groups: group norm needs num_groups > 0, got -2",
    ),
    (
        _config(GROUP, num_features=6, num_groups=4),
        "config.num_groups: must divide num_features (6), got 4",
    ),
    (
        _config(GROUP, num_features=6, num_groups=3, bias=False),
        "config.bias: only layer norm reads it; group norm's comes with affine",
    ),
    (
        _config(RMS, normalized_shape=[4], bias=True),
        "config.bias: only layer norm reads it; RMS norm has no bias",
    ),
    (
        _config(GROUP, num_groups=1),
        "config.num_features: must be between 1 and 1048320 (this server's --max-features), got 0",
    ),
    (
        _config(INST, num_features=4, momentum=1.5),
        "config.momentum: must be in (0, 1], or unset for a cumulative average; got 1.5",
    ),
    (
        _config(LAYER, normalized_shape=[4], eps=0),
        "config.eps: must be between 1.18e-38 (float32's smallest normal) and 1e+06, got 0.0",
    ),
    (
        _config(LAYER, normalized_shape=[4], bias=False, initial_bias=tensor(torch.zeros(4))),
        "config.initial_bias: this layer norm session has no bias to initialize",
    ),
    (
        _config(RMS, normalized_shape=[4], initial_bias=tensor(torch.zeros(4))),
        "config.initial_bias: this RMS norm session has no bias to initialize",
    ),
    (
        _config(LAYER, normalized_shape=[2, 2], initial_weight=tensor(torch.ones(4))),
        "config.initial_weight: expected shape [2, 2], got [4]",
    ),
    (
        _config(INST, num_features=3, initial_weight=tensor(torch.ones(3))),
        "config.initial_weight: needs affine=true",
    ),
]


@pytest.mark.parametrize(("config", "message"), CONFIG_ERRORS)
def test_config_errors(
    stub: pb_grpc.NormalizerStub, config: pb.SessionConfig, message: str
) -> None:
    with expect_status(INVALID, message):
        stub.CreateSession(pb.CreateSessionRequest(config=config))


INPUT_ERRORS: list[tuple[dict[str, Any], list[int], str, str]] = [
    (
        {"kind": "layer_norm", "num_features": 0, "normalized_shape": [3, 4]},
        [3, 4],
        "train",
        "input.shape: expected [N, ..., 3, 4]: a batch dim, then the normalized dims [3, 4]; got "
        "rank 2 [3, 4]",
    ),
    (
        {"kind": "layer_norm", "num_features": 0, "normalized_shape": [3, 4]},
        [2, 4, 3],
        "eval",
        "input.shape: the last 2 dim(s) must be normalized_shape [3, 4], got [2, 4, 3]",
    ),
    (
        {"kind": "rms_norm", "num_features": 0, "normalized_shape": [5]},
        [2, 3, 4],
        "train",
        "input.shape: the last 1 dim(s) must be normalized_shape [5], got [2, 3, 4]",
    ),
    (
        {"kind": "group_norm", "num_features": 4, "num_groups": 2},
        [4],
        "train",
        "input.shape: expected rank 2 or more ([N, C, *]), got rank 1 [4]",
    ),
    (
        {"kind": "group_norm", "num_features": 4, "num_groups": 2},
        [2, 6, 3],
        "train",
        "input.shape[1]: expected 4 channels (num_features), got 6",
    ),
    (
        {"kind": "group_norm", "num_features": 4, "num_groups": 4},
        [1, 4],
        "eval",
        "input.shape: expected more than 1 value per group across the batch (torch's rule), got "
        "input size [1, 4]",
    ),
    (
        {"kind": "instance_norm", "num_features": 3},
        [2, 3],
        "train",
        "input.shape: expected rank 3 to 5 ([N, C, L], [N, C, H, W] or [N, C, D, H, W], as "
        "InstanceNorm1d/2d/3d), got rank 2 [2, 3]",
    ),
    (
        {"kind": "instance_norm", "num_features": 3},
        [1, 3, 1, 1, 1, 2],
        "train",
        "input.shape: expected rank 3 to 5 ([N, C, L], [N, C, H, W] or [N, C, D, H, W], as "
        "InstanceNorm1d/2d/3d), got rank 6 [1, 3, 1, 1, 1, 2]",
    ),
    (
        {"kind": "instance_norm", "num_features": 3},
        [2, 5, 4],
        "train",
        "input.shape[1]: expected 3 channels (num_features), got 5",
    ),
    (
        {"kind": "instance_norm", "num_features": 3, "track_running_stats": True},
        [4, 3, 1, 1],
        "train",
        "input.shape: expected more than 1 spatial element per instance (torch's rule), got "
        "input size [4, 3, 1, 1]",
    ),
    (
        {"kind": "instance_norm", "num_features": 3},
        [4, 3, 1],
        "eval",
        "input.shape: expected more than 1 spatial element per instance (torch's rule), got "
        "input size [4, 3, 1]",
    ),
]


@pytest.mark.parametrize(("session", "shape", "mode", "message"), INPUT_ERRORS)
def test_input_errors_change_nothing(
    client: Client,
    stub: pb_grpc.NormalizerStub,
    session: dict[str, Any],
    shape: list[int],
    mode: str,
    message: str,
) -> None:
    sid = client.create_session(**session).session_id
    with unchanged(client, sid), expect_status(INVALID, message):
        stub.Normalize(
            pb.NormalizeRequest(
                session_id=sid,
                mode=pb.MODE_TRAIN if mode == "train" else pb.MODE_EVAL,
                input=tensor(torch.randn(shape)),
            )
        )


def test_instance_norm_in_eval_with_running_statistics_takes_one_spatial_element(
    client: Client,
) -> None:
    # torch's rule holds only where the input's own statistics are used
    sid = client.create_session(3, kind="instance_norm", track_running_stats=True).session_id
    ref = nn.InstanceNorm1d(3, track_running_stats=True).eval()
    x = torch.randn(4, 3, 1)
    torch.testing.assert_close(client.normalize(sid, x, mode="eval").output, ref(x), **TOL)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            [1, 3, 5],
            "chunk.shape: the last 1 dim(s) must be normalized_shape [4], got [1, 3, 5]",
        ),
        (
            [1, 5, 4],
            "chunk.shape: chunks of one batch may differ only in dim 0: expected [*, 3, 4], got "
            "[1, 5, 4]",
        ),
    ],
)
def test_chunks_of_a_batch_must_agree(
    client: Client, stub: pb_grpc.NormalizerStub, second: list[int], message: str
) -> None:
    sid = client.create_session(0, kind="layer_norm", normalized_shape=[4]).session_id
    requests = [
        pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(2, 3, 4))
        ),
        pb.NormalizeStreamRequest(chunk=tensor(torch.randn(second)), end_of_batch=True),
    ]
    with expect_status(INVALID, message):
        list(stub.NormalizeStream(iter(requests)))


def test_a_batch_whose_statistics_would_not_fit_one_answer_is_refused() -> None:
    # per-sample statistics grow with the batch: [N, C] for instance norm
    with serving(max_message_bytes=16384) as srv, Client(srv.address, chunk_bytes=5120) as client:
        sid = client.create_session(64, kind="instance_norm", track_running_stats=True).session_id
        x = torch.randn(100, 64, 2)
        with unchanged(client, sid), pytest.raises(ResourceExhaustedError) as err:
            list(client.normalize_stream(sid, [x], mode="train"))
        assert err.value.message == (
            "the statistics of batch 0 of this stream (6400 values each of mean and var, for "
            "input [100, 64, 2]) and its first output chunk would exceed the server's message "
            "limit of 16384 bytes; send smaller batches (end_of_batch sooner); nothing of the "
            "batch was applied"
        )
        # smaller batches go through
        results = list(client.normalize_stream(sid, list(x.split(10)), mode="train"))
        assert len(results) == 10


def test_sessions_of_every_kind_survive_a_restart_with_a_durable_store(tmp_path: Any) -> None:
    g = torch.Generator().manual_seed(9)
    cases = [
        _case("layer_norm", g, normalized=[2, 4], bias=False),
        _case("rms_norm", g, normalized=[8], eps=None),
        _case("group_norm", g, channels=6, groups=3),
        _case("instance_norm", g, affine=True, track=True),
    ]
    ids = []
    with serving(state_dir=str(tmp_path), durability="strict") as srv, Client(srv.address) as c:
        for case in cases:
            sid = c.create_session(**case.session).session_id
            c.normalize(sid, _input(case, g, 3), mode="train")
            ids.append((sid, c.get_session(sid), c.export_state(sid)))
    with serving(state_dir=str(tmp_path), durability="strict") as srv, Client(srv.address) as c:
        for case, (sid, info, state) in zip(cases, ids, strict=True):
            again = c.get_session(sid)
            assert (again.kind, again.normalized_shape, again.num_groups, again.eps) == (
                info.kind,
                info.normalized_shape,
                info.num_groups,
                info.eps,
            )
            assert again.version == info.version
            for key, value in c.export_state(sid).items():
                assert torch.equal(value, state[key]), key
            x = _input(case, g, 2)
            case.module.eval()
            case.module.load_state_dict(state)
            with torch.no_grad():
                torch.testing.assert_close(
                    c.normalize(sid, x, mode="eval").output, case.module(x), **TOL
                )
