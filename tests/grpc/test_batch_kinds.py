"""Batch renorm and ghost batch norm sessions over gRPC against references written from their
definitions in plain torch ops (torch has no module for either): unary and streamed batches,
TRAIN and EVAL, renorm's warm-up schedule, the statistics answered, state, and every
validation error with its exact message."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normserve.client import Client, InvalidArgumentError, RenormLimits
from normserve.server import Server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from tests.grpc._util import expect_status, serving, tensor

TOL = {"atol": 1e-5, "rtol": 1e-5}
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serving(workers=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def streaming(server: Server) -> Iterator[Client]:
    """Every batch streamed a few rows per chunk (chunks need not align with virtual batches)."""
    with Client(server.address, timeout=30, chunk_bytes=16) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[pb_grpc.NormalizerStub]:
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.NormalizerStub(channel)
    channel.close()


class Reference:
    """Batch norm's running statistics in float64, with the paper's batch renorm (Ioffe 2017,
    Algorithm 1) or ghost batch norm's loop over virtual batches in TRAIN."""

    def __init__(
        self,
        channels: int,
        eps: float,
        momentum: float | None,
        weight: torch.Tensor,
        bias: torch.Tensor,
        renorm: RenormLimits | None = None,
        ghost: int = 0,
    ) -> None:
        self.eps, self.momentum, self.renorm, self.ghost = eps, momentum, renorm, ghost
        self.weight, self.bias = weight.double(), bias.double()
        self.rm = torch.zeros(channels, dtype=torch.float64)
        self.rv = torch.ones(channels, dtype=torch.float64)
        self.n = 0

    def _shaped(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.view(1, -1, *[1] * (ndim - 2))

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        return y * self._shaped(self.weight, y.dim()) + self._shaped(self.bias, y.dim())

    def _update(self, mu: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.n += 1
        factor = self.momentum if self.momentum is not None else 1.0 / self.n
        self.rm = self.rm + factor * (mu - self.rm)
        self.rv = self.rv + factor * (var * count / (count - 1) - self.rv)

    def eval(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.double()
        y = (x - self._shaped(self.rm, x.dim())) / self._shaped(
            (self.rv + self.eps).sqrt(), x.dim()
        )
        return self._affine(y), self.rm.clone(), self.rv.clone()

    def train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = x.double()
        dims = [0, *range(2, x.dim())]
        if self.renorm is None:  # ghost batch norm
            outs, means, vars_ = [], [], []
            for p in x.split(self.ghost):
                mu, var = p.mean(dim=dims), p.var(dim=dims, unbiased=False)
                y = (p - self._shaped(mu, x.dim())) / self._shaped((var + self.eps).sqrt(), x.dim())
                outs.append(self._affine(y))
                means.append(mu)
                vars_.append(var)
                self._update(mu, var, p.numel() // p.shape[1])
            return torch.cat(outs), torch.stack(means), torch.stack(vars_)
        lim, t = self.renorm, self.n  # t batches came before this one
        rmax = 1 + (lim.rmax - 1) * (
            min(1.0, t / lim.rmax_warmup_steps) if lim.rmax_warmup_steps else 1.0
        )
        dmax = lim.dmax * (min(1.0, t / lim.dmax_warmup_steps) if lim.dmax_warmup_steps else 1.0)
        mu, var = x.mean(dim=dims), x.var(dim=dims, unbiased=False)
        sigma_b, sigma = (var + self.eps).sqrt(), (self.rv + self.eps).sqrt()
        r = (sigma_b / sigma).clamp(1 / rmax, rmax)
        d = ((mu - self.rm) / sigma).clamp(-dmax, dmax)
        y = (x - self._shaped(mu, x.dim())) / self._shaped(sigma_b, x.dim()) * self._shaped(
            r, x.dim()
        ) + self._shaped(d, x.dim())
        self._update(mu, var, x.numel() // x.shape[1])
        # the statistics the answer carries: those that make (x - mean) / sqrt(var + eps) the same
        return self._affine(y), mu - d * sigma_b / r, sigma_b.square() / r.square() - self.eps

    def state(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.weight,
            "bias": self.bias,
            "running_mean": self.rm,
            "running_var": self.rv,
            "num_batches_tracked": torch.tensor(self.n),
        }


def _run(
    client: Client, session: dict[str, Any], ref: Reference, batches: list[tuple[str, torch.Tensor]]
) -> None:
    sid = client.create_session(**session).session_id
    for mode, x in batches:
        expected, mean, var = ref.train(x) if mode == "train" else ref.eval(x)
        got = client.normalize(sid, x, mode=mode)  # type: ignore[arg-type]
        torch.testing.assert_close(got.output.double(), expected, **TOL)
        assert got.mean.shape == mean.shape
        torch.testing.assert_close(got.mean.double(), mean, **TOL)
        torch.testing.assert_close(got.var.double(), var, **TOL)
    state = client.export_state(sid)
    expected_state = ref.state()
    assert list(state) == list(expected_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key].double(), value.double(), **TOL)


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    channels = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 4), max_size=2))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    ghost = draw(st.integers(2, 6))
    per = math.prod(spatial)
    modes = draw(st.lists(st.sampled_from(["train", "train", "eval"]), min_size=1, max_size=5))
    batches = []
    for mode in modes:
        n = draw(st.integers(2, 13))
        if per == 1 and n % ghost == 1:  # a virtual batch of 1 value per channel is refused
            n += 1
        # well conditioned, spread ~2 around a shifted mean: r and d clip against the initial
        # running statistics (mean 0, var 1) unless their limits are wide
        x = (
            torch.randn([n, channels, *spatial], generator=g) * 2
            + float(torch.randn(1, generator=g)) * 3
        )
        batches.append((mode, x))
    return {
        "channels": channels,
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.1])),
        "momentum": draw(st.sampled_from([0.1, 0.5, None])),
        "ghost": ghost,
        "renorm": RenormLimits(
            draw(st.sampled_from([1.0, 1.5, 3.0])),
            draw(st.sampled_from([0.0, 0.5, 5.0])),
            draw(st.integers(0, 3)),
            draw(st.integers(0, 3)),
        ),
        "weight": torch.rand(channels, generator=g) + 0.5,
        "bias": torch.randn(channels, generator=g),
        "batches": batches,
    }


def _both(sc: dict[str, Any], kind: str) -> tuple[dict[str, Any], Reference]:
    c = sc["channels"]
    session: dict[str, Any] = {
        "num_features": c,
        "kind": kind,
        "eps": sc["eps"],
        "momentum": sc["momentum"],
        "weight": sc["weight"],
        "bias": sc["bias"],
    }
    if kind == "batch_renorm":
        session["renorm"] = sc["renorm"]
        ref = Reference(c, sc["eps"], sc["momentum"], sc["weight"], sc["bias"], renorm=sc["renorm"])
    else:
        session["ghost_batch_size"] = sc["ghost"]
        ref = Reference(c, sc["eps"], sc["momentum"], sc["weight"], sc["bias"], ghost=sc["ghost"])
    return session, ref


@settings(max_examples=25, deadline=None)
@given(sc=scenarios())
def test_batch_renorm_matches_the_paper(
    client: Client, streaming: Client, sc: dict[str, Any]
) -> None:
    for c in (client, streaming):
        _run(c, *_both(sc, "batch_renorm"), sc["batches"])


@settings(max_examples=25, deadline=None)
@given(sc=scenarios())
def test_ghost_batch_norm_matches_a_loop_of_batch_norm(
    client: Client, streaming: Client, sc: dict[str, Any]
) -> None:
    for c in (client, streaming):
        _run(c, *_both(sc, "ghost_batch_norm"), sc["batches"])


def test_ghost_batch_norm_is_torchs_batch_norm_per_virtual_batch(client: Client) -> None:
    """The reference itself, against torch: F.batch_norm over input.split(G), in order."""
    g = torch.Generator().manual_seed(7)
    sid = client.create_session(3, kind="ghost_batch_norm", ghost_batch_size=4).session_id
    rm, rv = torch.zeros(3), torch.ones(3)
    for n in (10, 8, 3):
        x = torch.randn(n, 3, 5, generator=g) * 2 + 1
        expected = torch.cat(
            [F.batch_norm(p, rm, rv, training=True, momentum=0.1) for p in x.split(4)]
        )
        got = client.normalize(sid, x)
        torch.testing.assert_close(got.output, expected, **TOL)
        assert got.mean.shape == (math.ceil(n / 4), 3)
    info = client.get_session(sid)
    assert info.num_batches_tracked == 3 + 2 + 1
    torch.testing.assert_close(info.running_mean, rm, **TOL)
    torch.testing.assert_close(info.running_var, rv, **TOL)
    x = torch.randn(6, 3, 5, generator=g)
    got = client.normalize(sid, x, mode="eval")
    torch.testing.assert_close(got.output, F.batch_norm(x, rm, rv, training=False), **TOL)


def test_batch_renorm_warm_up_starts_as_batch_norm_and_reaches_its_limits(client: Client) -> None:
    """With a warm-up of 2 batches, the first is plain batch norm (r = 1, d = 0); from the third
    on, r and d clip at rmax and dmax; the schedule is read back from num_batches_tracked, so an
    import moves it."""
    limits = RenormLimits(rmax=1.5, dmax=0.25, rmax_warmup_steps=2, dmax_warmup_steps=2)
    sid = client.create_session(2, kind="batch_renorm", renorm=limits).session_id
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, generator=g) * 4 + 2  # sigma_B / sigma ~ 4, mean ~ 2: both clip
    first = client.normalize(sid, x)
    torch.testing.assert_close(first.output, F.batch_norm(x, None, None, training=True), **TOL)
    ref = Reference(2, 1e-5, 0.1, torch.ones(2), torch.zeros(2), renorm=limits)
    ref.train(x)
    for _ in range(3):
        expected, _, _ = ref.train(x)
        torch.testing.assert_close(client.normalize(sid, x).output.double(), expected, **TOL)
    # back to num_batches_tracked 1: the next batch is the second of the ramp again
    state = client.export_state(sid)
    state["num_batches_tracked"] = torch.tensor(1)
    client.import_state(sid, state)
    ref2 = Reference(2, 1e-5, 0.1, torch.ones(2), torch.zeros(2), renorm=limits)
    ref2.n, ref2.rm, ref2.rv = 1, state["running_mean"].double(), state["running_var"].double()
    expected, _, _ = ref2.train(x)
    torch.testing.assert_close(client.normalize(sid, x).output.double(), expected, **TOL)


def test_sessions_show_their_fields(client: Client) -> None:
    info = client.create_session(4, kind="batch_renorm")
    assert (info.kind, info.renorm, info.ghost_batch_size) == (
        "batch_renorm",
        RenormLimits(3.0, 5.0, 0, 0),
        0,
    )
    assert info.track_running_stats and info.momentum == 0.1
    info = client.create_session(4, kind="ghost_batch_norm", ghost_batch_size=32)
    assert (info.kind, info.renorm, info.ghost_batch_size) == ("ghost_batch_norm", None, 32)


RENORM, GHOST, BATCH = (
    pb.NORM_KIND_BATCH_RENORM,
    pb.NORM_KIND_GHOST_BATCH_NORM,
    pb.NORM_KIND_BATCH_NORM,
)
CONFIG_ERRORS = [
    (
        pb.SessionConfig(kind=RENORM, num_features=2, renorm=pb.BatchRenormConfig(rmax=0.5)),
        "config.renorm.rmax: must be a finite value >= 1, got 0.5",
    ),
    (
        pb.SessionConfig(kind=RENORM, num_features=2, renorm=pb.BatchRenormConfig(dmax=-1)),
        "config.renorm.dmax: must be a finite value >= 0, got -1.0",
    ),
    (
        pb.SessionConfig(
            kind=RENORM, num_features=2, renorm=pb.BatchRenormConfig(rmax_warmup_steps=-3)
        ),
        "config.renorm.rmax_warmup_steps: must be >= 0 (0: no warm-up), got -3",
    ),
    (
        pb.SessionConfig(kind=RENORM, num_features=2, track_running_stats=False),
        "config.track_running_stats: batch renorm corrects batch statistics towards running "
        "ones; it needs true",
    ),
    (
        pb.SessionConfig(kind=BATCH, num_features=2, renorm=pb.BatchRenormConfig()),
        "config.renorm: only batch renorm reads it, not NORM_KIND_BATCH_NORM",
    ),
    (
        pb.SessionConfig(kind=RENORM, num_features=2, ghost_batch_size=4),
        "config.ghost_batch_size: only ghost batch norm reads it, not batch renorm",
    ),
    (
        pb.SessionConfig(kind=GHOST, num_features=2),
        "config.ghost_batch_size: ghost batch norm needs ghost_batch_size > 0, got 0",
    ),
    (
        pb.SessionConfig(kind=GHOST, num_features=2, ghost_batch_size=-2),
        "config.ghost_batch_size: ghost batch norm needs ghost_batch_size > 0, got -2",
    ),
]


@pytest.mark.parametrize(("config", "message"), CONFIG_ERRORS)
def test_config_errors(
    stub: pb_grpc.NormalizerStub, config: pb.SessionConfig, message: str
) -> None:
    with expect_status(INVALID, message):
        stub.CreateSession(pb.CreateSessionRequest(config=config))


def test_a_virtual_batch_of_one_value_per_channel_is_refused_and_changes_nothing(
    stub: pb_grpc.NormalizerStub, client: Client
) -> None:
    created = client.create_session(2, kind="ghost_batch_norm", ghost_batch_size=4)
    sid = created.session_id
    request = pb.NormalizeRequest(
        session_id=sid, mode=pb.MODE_TRAIN, input=tensor(torch.randn(5, 2))
    )
    with expect_status(
        INVALID,
        "input.shape: virtual batch 1 (of ghost_batch_size 4) has 1 value per channel; batch "
        "statistics need more, got input size [5, 2]",
    ):
        stub.Normalize(request)
    info = client.get_session(sid)
    assert info.version == created.version and info.num_batches_tracked == 0


# ---- recurrent batch norm: T torch BatchNorm modules, one per slot


@st.composite
def recurrent_scenarios(draw: st.DrawFn) -> dict[str, Any]:
    channels = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 4), max_size=2))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    steps = draw(st.integers(1, 4))
    calls = []
    for _ in range(draw(st.integers(1, 8))):
        mode = draw(st.sampled_from(["train", "train", "eval"]))
        t = draw(st.integers(0, steps + 2))  # past T: the last slot
        x = torch.randn([draw(st.integers(2, 9)), channels, *spatial], generator=g) * 2 + 1
        calls.append((mode, t, x))
    return {
        "channels": channels,
        "steps": steps,
        "eps": draw(st.sampled_from([1e-5, 1e-3])),
        "momentum": draw(st.sampled_from([0.1, 0.7])),
        "track": draw(st.booleans()),
        "weight": torch.rand(channels, generator=g) + 0.5,
        "bias": torch.randn(channels, generator=g),
        "calls": calls,
    }


@settings(max_examples=25, deadline=None)
@given(sc=recurrent_scenarios())
def test_recurrent_batch_norm_matches_a_batch_norm_per_step(
    client: Client, streaming: Client, sc: dict[str, Any]
) -> None:
    c, steps = sc["channels"], sc["steps"]
    for cl in (client, streaming):
        refs = [
            torch.nn.BatchNorm1d(
                c, sc["eps"], sc["momentum"], track_running_stats=sc["track"]
            ).double()
            for _ in range(steps)
        ]
        for m in refs:
            with torch.no_grad():
                m.weight.copy_(sc["weight"])
                m.bias.copy_(sc["bias"])
        sid = cl.create_session(
            c,
            kind="recurrent_batch_norm",
            time_steps=steps,
            eps=sc["eps"],
            momentum=sc["momentum"],
            track_running_stats=sc["track"],
            weight=sc["weight"],
            bias=sc["bias"],
        ).session_id
        for mode, t, x in sc["calls"]:
            ref = refs[min(t, steps - 1)]
            ref.train(mode == "train")
            x64 = x.double()
            if x.dim() == 4:  # BatchNorm1d's kernel takes any [N, C, *]; flatten the spatial dims
                x64 = x64.flatten(2)
            with torch.no_grad():
                expected = ref(x64).reshape(x.shape)
            got = cl.normalize(sid, x, mode=mode, time_step=t)  # type: ignore[arg-type]
            torch.testing.assert_close(got.output.double(), expected, **TOL)
            if mode == "eval" and sc["track"]:  # the slot's running statistics, [C]
                torch.testing.assert_close(got.mean.double(), ref.running_mean, **TOL)
                torch.testing.assert_close(got.var.double(), ref.running_var, **TOL)
        state = cl.export_state(sid)
        if sc["track"]:
            for key in ("running_mean", "running_var"):
                want = torch.stack([getattr(m, key) for m in refs])
                torch.testing.assert_close(state[key].double(), want, **TOL)
            trained = sum(1 for mode, _, _ in sc["calls"] if mode == "train")
            assert int(state["num_batches_tracked"]) == trained
        else:
            assert list(state) == ["weight", "bias"]


def test_recurrent_state_is_t_by_c_and_imports_back(client: Client) -> None:
    info = client.create_session(3, kind="recurrent_batch_norm", time_steps=4)
    assert (info.kind, info.time_steps, info.momentum) == ("recurrent_batch_norm", 4, 0.1)
    state = client.export_state(info.session_id)
    assert state["running_mean"].shape == (4, 3) and state["running_var"].shape == (4, 3)
    state["running_mean"] = torch.arange(12.0).reshape(4, 3)
    client.import_state(info.session_id, state)
    x = torch.randn(5, 3)
    got = client.normalize(info.session_id, x, mode="eval", time_step=9)  # slot 3
    torch.testing.assert_close(got.mean, torch.tensor([9.0, 10.0, 11.0]))
    with pytest.raises(InvalidArgumentError) as err:
        client.import_state(info.session_id, {"running_mean": torch.zeros(3)}, strict=False)
    assert "expected shape [4, 3], got [3]" in str(err.value)


RECURRENT_CONFIG_ERRORS = [
    (
        pb.SessionConfig(kind=pb.NORM_KIND_RECURRENT_BATCH_NORM, num_features=2),
        "config.time_steps: recurrent batch norm needs time_steps > 0, got 0",
    ),
    (
        pb.SessionConfig(kind=pb.NORM_KIND_RECURRENT_BATCH_NORM, num_features=2, time_steps=2),
        "config.momentum: recurrent batch norm keeps one num_batches_tracked for all its slots, "
        "so no cumulative average per slot; give a momentum",
    ),
    (
        pb.SessionConfig(kind=BATCH, num_features=2, time_steps=3),
        "config.time_steps: only recurrent batch norm reads it, not batch norm",
    ),
    (
        pb.SessionConfig(
            kind=pb.NORM_KIND_RECURRENT_BATCH_NORM,
            num_features=2,
            time_steps=1 << 40,
            momentum=0.1,
        ),
        "config.time_steps: time_steps x num_features must be at most 1048320 (this server's "
        "--max-features), got 1099511627776 x 2",
    ),
]


@pytest.mark.parametrize(("config", "message"), RECURRENT_CONFIG_ERRORS)
def test_recurrent_config_errors(
    stub: pb_grpc.NormalizerStub, config: pb.SessionConfig, message: str
) -> None:
    with expect_status(INVALID, message):
        stub.CreateSession(pb.CreateSessionRequest(config=config))


def test_time_step_errors_change_nothing(
    stub: pb_grpc.NormalizerStub, client: Client, streaming: Client
) -> None:
    rec = client.create_session(2, kind="recurrent_batch_norm", time_steps=2)
    bn = client.create_session(2)
    x = tensor(torch.randn(4, 2))
    for sid, step, message in [
        (rec.session_id, -1, "time_step: must be >= 0, got -1"),
        (
            bn.session_id,
            1,
            "time_step: only recurrent batch norm reads it, not batch norm; leave it 0, got 1",
        ),
    ]:
        with expect_status(INVALID, message):
            stub.Normalize(
                pb.NormalizeRequest(session_id=sid, mode=pb.MODE_TRAIN, input=x, time_step=step)
            )
        request = pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=x, end_of_batch=True, time_step=step
        )
        with expect_status(INVALID, message):
            list(stub.NormalizeStream(iter([request])))
    assert client.get_session(rec.session_id).version == rec.version
    assert client.get_session(bn.session_id).version == bn.version


def test_sessions_of_these_kinds_survive_a_restart_with_a_durable_store(tmp_path: Any) -> None:
    """Their fields and state (renorm's schedule lives in num_batches_tracked; recurrent's [T, C]
    statistics) come back from the local durable store, and training goes on from them."""
    sessions: list[dict[str, Any]] = [
        {"kind": "batch_renorm", "renorm": RenormLimits(2.0, 1.0, 5, 3)},
        {"kind": "ghost_batch_norm", "ghost_batch_size": 4},
        {"kind": "recurrent_batch_norm", "time_steps": 3},
    ]
    g = torch.Generator().manual_seed(4)
    saved = []
    with serving(state_dir=str(tmp_path), durability="strict") as srv, Client(srv.address) as c:
        for options in sessions:
            sid = c.create_session(3, **options).session_id
            step = 1 if options["kind"] == "recurrent_batch_norm" else 0
            for _ in range(2):
                c.normalize(sid, torch.randn(7, 3, generator=g) * 2 + 1, time_step=step)
            saved.append((sid, c.get_session(sid), c.export_state(sid)))
    x = torch.randn(7, 3, generator=g)
    with serving(state_dir=str(tmp_path), durability="strict") as srv, Client(srv.address) as c:
        for options, (sid, info, state) in zip(sessions, saved, strict=True):
            again = c.get_session(sid)
            fields = ("kind", "renorm", "ghost_batch_size", "time_steps", "version")
            assert [getattr(again, f) for f in fields] == [getattr(info, f) for f in fields]
            for key, value in c.export_state(sid).items():
                assert torch.equal(value, state[key]), key
            # the next TRAIN batch goes on from the restored state, as from an imported copy
            copy = c.create_session(3, **options).session_id
            c.import_state(copy, state)
            step = 1 if info.time_steps else 0
            torch.testing.assert_close(
                c.normalize(sid, x, time_step=step).output,
                c.normalize(copy, x, time_step=step).output,
            )


def test_an_idempotency_key_is_tied_to_its_time_step(client: Client, streaming: Client) -> None:
    sid = client.create_session(2, kind="recurrent_batch_norm", time_steps=3).session_id
    x = torch.randn(4, 2)
    for c in (client, streaming):
        key = f"key-{id(c)}"
        first = c.normalize(sid, x, idempotency_key=key, time_step=1)
        again = c.normalize(sid, x, idempotency_key=key, time_step=1)
        assert again.replayed and again.version == first.version
        with pytest.raises(InvalidArgumentError) as err:
            c.normalize(sid, x, idempotency_key=key, time_step=2)
        assert "was applied to another request" in str(err.value)


def test_the_cli_creates_and_shows_these_kinds(
    server: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    from normserve.client._cli import main

    remote = ["--target", server.address]
    for flags, shown in [
        (
            ["--kind", "batch_renorm", "--rmax", "2", "--dmax-warmup-steps", "10"],
            "renorm       rmax 2 (warm-up 0), dmax 5 (warm-up 10)",
        ),
        (["--kind", "ghost_batch_norm", "--ghost-batch-size", "8"], "ghost batch  8"),
        (["--kind", "recurrent_batch_norm", "--time-steps", "3"], "time steps   3"),
    ]:
        assert main(["session", "create", "4", *flags, *remote, "--json"]) == 0
        created = json.loads(capsys.readouterr().out)
        assert created["kind"] == flags[1]
        assert main(["session", "show", created["session_id"], *remote]) == 0
        out = capsys.readouterr().out
        assert shown in out
    assert created["time_steps"] == 3 and len(created["running_mean"]) == 3


def test_ghost_batch_norm_without_running_statistics(client: Client, streaming: Client) -> None:
    """TRAIN still splits into virtual batches; EVAL uses the whole batch's statistics, as batch
    norm without running statistics does."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(10, 3, 2, generator=g) * 2 + 1
    for c in (client, streaming):
        sid = c.create_session(
            3, kind="ghost_batch_norm", ghost_batch_size=4, track_running_stats=False
        ).session_id
        train = c.normalize(sid, x)
        expected = torch.cat([F.batch_norm(p, None, None, training=True) for p in x.split(4)])
        torch.testing.assert_close(train.output, expected, **TOL)
        assert train.mean.shape == (3, 3)
        evaluated = c.normalize(sid, x, mode="eval")
        torch.testing.assert_close(
            evaluated.output, F.batch_norm(x, None, None, training=True), **TOL
        )
        assert evaluated.mean.shape == (3,)


@pytest.mark.parametrize(
    "options",
    [
        {"kind": "batch_renorm", "renorm": RenormLimits(1.5, 0.5)},
        {"kind": "ghost_batch_norm", "ghost_batch_size": 3},
        {"kind": "recurrent_batch_norm", "time_steps": 2},
    ],
)
def test_statistics_only_updates_as_a_full_call_does(
    client: Client, streaming: Client, options: dict[str, Any]
) -> None:
    g = torch.Generator().manual_seed(12)
    step = 1 if "time_steps" in options else 0
    for c in (client, streaming):
        full = c.create_session(3, **options).session_id
        stats = c.create_session(3, **options).session_id
        for _ in range(3):
            x = torch.randn(8, 3, generator=g) * 2 + 1
            a = c.normalize(full, x, time_step=step)
            b = c.normalize(stats, x, statistics_only=True, time_step=step)
            assert b.output is None
            torch.testing.assert_close(b.mean, a.mean, **TOL)
            torch.testing.assert_close(b.var, a.var, **TOL)
        sa, sb = c.export_state(full), c.export_state(stats)
        for key, value in sa.items():
            torch.testing.assert_close(sb[key], value, **TOL)


def test_a_later_chunk_may_not_change_the_time_step(
    stub: pb_grpc.NormalizerStub, client: Client
) -> None:
    info = client.create_session(2, kind="recurrent_batch_norm", time_steps=3)
    chunks = [
        pb.NormalizeStreamRequest(
            session_id=info.session_id,
            mode=pb.MODE_TRAIN,
            chunk=tensor(torch.randn(3, 2)),
            time_step=1,
        ),
        pb.NormalizeStreamRequest(chunk=tensor(torch.randn(3, 2)), time_step=1),
        pb.NormalizeStreamRequest(chunk=tensor(torch.randn(3, 2)), end_of_batch=True, time_step=2),
    ]
    with expect_status(
        INVALID,
        "time_step: a later chunk of batch 0 names time step 2, the first named 1; nothing of "
        "that batch was applied",
    ):
        list(stub.NormalizeStream(iter(chunks)))
    assert client.get_session(info.session_id).version == info.version
