"""Recalibration (precise batch norm), freezing and adaptation on live data, through real gRPC:
every rule, every refusal's status and message, and the state unchanged after each refusal."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
import torch.nn.functional as F

from normserve.client import AsyncClient, Client, FailedPreconditionError, InvalidArgumentError
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_from_proto, tensor_to_proto
from tests._redis import RedisServer
from tests.grpc._util import expect_status, unchanged

FP = grpc.StatusCode.FAILED_PRECONDITION
IA = grpc.StatusCode.INVALID_ARGUMENT
C = 4


def _request(sid: str, x: torch.Tensor, mode: int, **fields: object) -> pb.NormalizeRequest:
    req = pb.NormalizeRequest(session_id=sid, mode=mode, **fields)  # type: ignore[arg-type]
    tensor_to_proto(x, req.input)
    return req


def _batches(sizes: list[int], c: int = C, spatial: tuple[int, ...] = (3, 2)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [torch.randn(n, c, *spatial, generator=g) * 3 + 5 for n in sizes]


def _population(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 mean and unbiased variance per channel of the concatenated batches."""
    flat = torch.cat([x.double().transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
    return flat.mean(dim=1), flat.var(dim=1, unbiased=True)


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=rel, atol=0)


# ---- recalibration


def test_calibration_accumulates_exact_population_statistics(client: Client) -> None:
    sid = client.create_session(C, momentum=0.1).session_id
    for x in _batches([6, 9]):  # trained a little: running statistics that are not the initial
        client.normalize(sid, x)
    before = client.get_session(sid)
    state_before = client.export_state(sid)
    xs = _batches([3, 17, 8, 1, 30])
    started = client.start_calibration(sid)
    assert started.calibrating and started.calibration_batches == 0
    assert started.version == before.version + 1
    for i, x in enumerate(xs):
        r = client.normalize(sid, x, mode="calibrate")
        # normalized with the batch's own statistics, as a TRAIN batch would be
        want = F.batch_norm(x, None, None, state_before["weight"], state_before["bias"], True)
        torch.testing.assert_close(r.output, want, rtol=1e-5, atol=1e-5)
        assert r.batch_statistics and r.version == started.version + i + 1
        # EVAL still answers with the old running statistics
        ev = client.normalize(sid, x, mode="eval")
        assert torch.equal(ev.mean, state_before["running_mean"])
        assert torch.equal(ev.var, state_before["running_var"])
    info = client.get_session(sid)
    assert (info.calibration_batches, info.calibration_samples) == (5, 59)
    assert info.calibration_start == started.calibration_start
    assert torch.equal(info.running_mean, state_before["running_mean"])
    done = client.commit_calibration(sid)
    assert not done.calibrating and done.version == info.version + 1
    assert done.num_batches_tracked == before.num_batches_tracked  # unchanged, as documented
    mean, var = _population(xs)
    _close(done.running_mean, mean)
    _close(done.running_var, var)
    # an exponential average over the same batches gives something else
    bn = torch.nn.BatchNorm2d(C, momentum=0.1)
    bn.load_state_dict(state_before)
    for x in xs:
        bn(x)
    assert (bn.running_var.double() - var).abs().max() > 1e-2
    ev = client.normalize(sid, xs[0], mode="eval")
    assert torch.equal(ev.mean, done.running_mean)


def test_abort_leaves_the_statistics_exactly_as_before(client: Client) -> None:
    sid = client.create_session(C).session_id
    client.normalize(sid, _batches([5])[0])
    before, state = client.get_session(sid), client.export_state(sid)
    client.start_calibration(sid)
    for x in _batches([4, 6]):
        client.normalize(sid, x, mode="calibrate", statistics_only=True)
    after = client.abort_calibration(sid)
    assert not after.calibrating
    for key, value in client.export_state(sid).items():
        assert torch.equal(value, state[key]), key
    # the version is the stores' compare-and-set counter: it moves on, never back
    assert after.version == before.version + 4
    assert after.num_batches_tracked == before.num_batches_tracked


def test_calibration_batches_honour_idempotency_keys(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(C).session_id
    client.start_calibration(sid)
    x = _batches([8])[0]
    first = stub.Normalize(_request(sid, x, pb.MODE_CALIBRATE, idempotency_key="c-1"))
    again = stub.Normalize(_request(sid, x, pb.MODE_CALIBRATE, idempotency_key="c-1"))
    assert again.replayed and not first.replayed and again.version == first.version
    assert client.get_session(sid).calibration_batches == 1
    with expect_status(
        IA,
        "idempotency_key: 'c-1' was applied to another request (calibrate:float32:8x4x3x2:0; "
        "this one is calibrate:float32:8x4x3x2:1): every call needs a key of its own; nothing "
        "was applied",
    ):
        stub.Normalize(
            _request(sid, x, pb.MODE_CALIBRATE, idempotency_key="c-1", statistics_only=True)
        )


def test_calibration_refusals_change_nothing(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(C, session_id="cal").session_id
    x = _batches([4])[0]
    with unchanged(client, sid):
        with expect_status(
            FP,
            "session 'cal' is not calibrating: a MODE_CALIBRATE batch needs StartCalibration first (`normserve session calibrate-start cal`)",
        ):
            stub.Normalize(_request(sid, x, pb.MODE_CALIBRATE))
        with expect_status(
            FP,
            "session 'cal' is not calibrating: CommitCalibration needs StartCalibration first (`normserve session calibrate-start cal`)",
        ):
            stub.CommitCalibration(pb.CommitCalibrationRequest(session_id=sid))
        with expect_status(
            FP,
            "session 'cal' is not calibrating: AbortCalibration needs StartCalibration first (`normserve session calibrate-start cal`)",
        ):
            stub.AbortCalibration(pb.AbortCalibrationRequest(session_id=sid))
    client.start_calibration(sid)
    with unchanged(client, sid):
        with expect_status(
            FP,
            "session 'cal' is already calibrating (0 batches so far); CommitCalibration or "
            "AbortCalibration first",
        ):
            stub.StartCalibration(pb.StartCalibrationRequest(session_id=sid))
        with expect_status(
            FP,
            "session 'cal': no calibration batch was accumulated; send MODE_CALIBRATE batches "
            "before CommitCalibration (or AbortCalibration)",
        ):
            stub.CommitCalibration(pb.CommitCalibrationRequest(session_id=sid))
        with expect_status(
            FP,
            "session 'cal' is calibrating: TRAIN updates are refused until CommitCalibration or "
            "AbortCalibration (`normserve session calibrate-commit|calibrate-abort cal`)",
        ):
            stub.Normalize(_request(sid, x, pb.MODE_TRAIN))
        with expect_status(
            IA,
            "input.shape: batch statistics need more than 1 value per channel, got input size "
            "[1, 4]; nothing was applied",
        ):
            stub.Normalize(_request(sid, torch.randn(1, C), pb.MODE_CALIBRATE))
        with expect_status(
            IA,
            "chunk.shape: batch statistics need more than 1 value per channel, got input size "
            "[1, 4]; nothing was applied",
        ):
            first = pb.NormalizeStreamRequest(
                session_id=sid, mode=pb.MODE_CALIBRATE, end_of_batch=True
            )
            tensor_to_proto(torch.randn(1, C), first.chunk)
            list(stub.NormalizeStream(iter([first])))
        with expect_status(IA, "input: contains NaN or Inf; nothing was applied"):
            stub.Normalize(_request(sid, torch.full((4, C), float("nan")), pb.MODE_CALIBRATE))
    assert client.get_session(sid).calibration_batches == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"kind": "layer_norm", "normalized_shape": (C,)},
            "session 'k' (layer norm): calibration needs batch norm, batch renorm, "
            "ghost batch norm or recurrent batch norm (it keeps no running statistics)",
        ),
        (
            {"kind": "instance_norm", "track_running_stats": True},
            "session 'k' (instance norm): calibration needs batch norm, batch renorm, "
            "ghost batch norm or recurrent batch norm (its running statistics average "
            "per-instance statistics, which have no population form to recalibrate or adapt)",
        ),
        (
            {"track_running_stats": False},
            "session 'k' keeps no running statistics (track_running_stats is false): "
            "calibration needs them",
        ),
    ],
)
def test_sessions_without_population_statistics_cannot_calibrate(
    client: Client, stub: pb_grpc.NormalizerStub, kwargs: dict[str, object], message: str
) -> None:
    features = 0 if kwargs.get("kind") == "layer_norm" else C
    sid = client.create_session(features, session_id="k", **kwargs).session_id  # type: ignore[arg-type]
    with unchanged(client, sid), expect_status(FP, message):
        stub.StartCalibration(pb.StartCalibrationRequest(session_id=sid))


def test_ghost_and_renorm_calibrate_over_all_samples(client: Client) -> None:
    xs = _batches([5, 12, 7])
    mean, var = _population(xs)
    for kwargs in ({"kind": "ghost_batch_norm", "ghost_batch_size": 4}, {"kind": "batch_renorm"}):
        sid = client.create_session(C, **kwargs).session_id  # type: ignore[arg-type]
        with client.calibration(sid):
            for x in xs:
                r = client.normalize(sid, x, mode="calibrate")
                assert r.mean.shape == (C,)  # whole-batch statistics: no virtual batches
        done = client.get_session(sid)
        _close(done.running_mean, mean)
        _close(done.running_var, var)


def test_recurrent_batch_norm_replaces_only_the_slots_that_received_data(client: Client) -> None:
    sid = client.create_session(C, kind="recurrent_batch_norm", time_steps=3).session_id
    for t in range(3):
        client.normalize(sid, torch.randn(6, C) + t, time_step=t)
    before = client.get_session(sid)
    a, b = _batches([5, 9], spatial=()), _batches([7], spatial=())
    with client.calibration(sid):
        for x in a:
            client.normalize(sid, x, mode="calibrate", time_step=0)
        client.normalize(sid, b[0], mode="calibrate", time_step=7)  # steps past the last: slot 2
    after = client.get_session(sid)
    for slot, xs in ((0, a), (2, b)):
        mean, var = _population(xs)
        _close(after.running_mean[slot], mean)
        _close(after.running_var[slot], var)
    assert torch.equal(after.running_mean[1], before.running_mean[1])
    assert torch.equal(after.running_var[1], before.running_var[1])


def test_the_context_manager_aborts_on_an_exception(client: Client) -> None:
    sid = client.create_session(C).session_id
    state = client.export_state(sid)
    with pytest.raises(RuntimeError, match="boom"), client.calibration(sid):
        client.normalize(sid, _batches([6])[0], mode="calibrate")
        raise RuntimeError("boom")
    info = client.get_session(sid)
    assert not info.calibrating
    assert torch.equal(info.running_mean, state["running_mean"])


def test_a_synchronized_session_calibrates_with_plain_calls(client: Client) -> None:
    sid = client.create_session(C, sync_participants=2).session_id
    xs = _batches([4, 6])
    with client.calibration(sid):
        for x in xs:
            client.normalize(sid, x, mode="calibrate")
    mean, var = _population(xs)
    _close(client.get_session(sid).running_var, var)
    _close(client.get_session(sid).running_mean, mean)


# ---- freezing


def test_a_frozen_session_refuses_every_change_and_answers_eval(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(C, session_id="ice").session_id
    x = torch.randn(8, C)
    client.normalize(sid, x)
    before = client.get_session(sid)
    frozen = client.freeze(sid)
    assert frozen.frozen and frozen.version == before.version + 1
    assert client.freeze(sid).version == frozen.version  # already frozen: nothing changes

    def refused(what: str) -> str:
        return (
            f"session 'ice' is frozen: it refuses to {what}; unfreeze it first (UnfreezeSession; "
            "`normserve session unfreeze ice`)"
        )

    state = client.export_state(sid)
    with unchanged(client, sid):
        with expect_status(FP, refused("apply TRAIN updates")):
            stub.Normalize(_request(sid, x, pb.MODE_TRAIN))
        with expect_status(FP, refused("apply TRAIN updates")):
            first = pb.NormalizeStreamRequest(session_id=sid, mode=pb.MODE_TRAIN, end_of_batch=True)
            tensor_to_proto(x, first.chunk)
            list(stub.NormalizeStream(iter([first])))
        with expect_status(FP, refused("reset")):
            stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
        entries = [pb.NamedTensor(name="running_mean", tensor=tensor_to_proto(torch.ones(C)))]
        with expect_status(FP, refused("import state")):
            stub.ImportState(pb.ImportStateRequest(session_id=sid, entries=entries))
        with expect_status(FP, refused("start a calibration")):
            stub.StartCalibration(pb.StartCalibrationRequest(session_id=sid))
        with expect_status(FP, refused("fold EVAL batches into adapted statistics")):
            stub.Normalize(
                _request(
                    sid,
                    x,
                    pb.MODE_EVAL,
                    adaptation=pb.Adaptation(batch_weight=0.5, accumulate=True),
                )
            )
        with expect_status(FP, refused("promote adapted statistics")):
            stub.PromoteAdaptation(pb.PromoteAdaptationRequest(session_id=sid))
        with expect_status(FP, refused("reset its adapted statistics")):
            stub.ResetAdaptation(pb.ResetAdaptationRequest(session_id=sid))
        ev = client.normalize(sid, x, mode="eval")
        assert torch.equal(ev.mean, state["running_mean"])
        client.normalize(sid, x, adapt=0.5)  # adapting without accumulating changes nothing
    thawed = client.unfreeze(sid)
    assert not thawed.frozen and thawed.version == frozen.version + 1
    assert client.normalize(sid, x).version == thawed.version + 1


def test_freezing_during_a_calibration_holds_it(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(C, session_id="hold").session_id
    client.start_calibration(sid)
    client.normalize(sid, torch.randn(8, C), mode="calibrate")
    client.freeze(sid)
    msg = (
        "session 'hold' is frozen: it refuses to {}; unfreeze it first (UnfreezeSession; "
        "`normserve session unfreeze hold`)"
    )
    with unchanged(client, sid):
        with expect_status(FP, msg.format("fold in calibration batches")):
            stub.Normalize(_request(sid, torch.randn(8, C), pb.MODE_CALIBRATE))
        with expect_status(FP, msg.format("commit a calibration")):
            stub.CommitCalibration(pb.CommitCalibrationRequest(session_id=sid))
        with expect_status(FP, msg.format("abort a calibration")):
            stub.AbortCalibration(pb.AbortCalibrationRequest(session_id=sid))
    client.unfreeze(sid)
    assert client.commit_calibration(sid).calibration_batches == 0


def test_freeze_of_an_unknown_session_is_not_found(stub: pb_grpc.NormalizerStub) -> None:
    with expect_status(grpc.StatusCode.NOT_FOUND, "session 'nope' not found"):
        stub.FreezeSession(pb.FreezeSessionRequest(session_id="nope"))


# ---- adaptation


def _reference(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, a: float, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prediction-time batch norm by hand: mix, then normalize (weight 1, bias 0)."""
    dims = [0, *range(2, x.dim())]
    bm = x.double().mean(dim=dims)
    bv = x.double().var(dim=dims, unbiased=False)
    m = (1 - a) * mean.double() + a * bm
    v = (1 - a) * var.double() + a * bv
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x.double() - m.view(shape)) / torch.sqrt(v.view(shape) + eps)
    return out.float(), m.float(), v.float()


@pytest.mark.parametrize("a", [0.0, 0.3, 1.0])
def test_adaptation_mixes_running_and_batch_statistics(client: Client, a: float) -> None:
    sid = client.create_session(C).session_id
    for x in _batches([8, 8]):
        client.normalize(sid, x)
    state, version = client.export_state(sid), client.get_session(sid).version
    x = _batches([16])[0] * 2 - 3
    r = client.normalize(sid, x, adapt=a)
    out, m, v = _reference(x, state["running_mean"], state["running_var"], a)
    torch.testing.assert_close(r.output, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r.mean, m, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r.var, v, rtol=1e-6, atol=1e-6)
    assert r.batch_statistics == (a > 0) and r.version == version
    # Schneider et al.'s prior strength N: a = n / (N + n)
    n, big_n = 16 * 3 * 2, 256
    r2 = client.normalize(sid, x, adapt=n / (big_n + n), statistics_only=True)
    _, m2, _ = _reference(x, state["running_mean"], state["running_var"], n / (big_n + n))
    torch.testing.assert_close(r2.mean, m2, rtol=1e-6, atol=1e-6)
    for key, value in client.export_state(sid).items():
        assert torch.equal(value, state[key]), key


def test_accumulated_adaptation_never_moves_the_training_statistics(client: Client) -> None:
    sid = client.create_session(C, momentum=0.2).session_id
    client.normalize(sid, _batches([8])[0])
    state = client.export_state(sid)
    rm, rv = state["running_mean"].clone(), state["running_var"].clone()
    am, av = rm.double(), rv.double()
    xs = _batches([6, 10, 5])
    for i, x in enumerate(xs):
        r = client.normalize(sid, x, adapt=0.25, adapt_accumulate=True)
        # normalized with the prior before this batch: the adapted statistics so far
        _, m, v = _reference(x, am.float(), av.float(), 0.25)
        torch.testing.assert_close(r.mean, m, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(r.var, v, rtol=1e-6, atol=1e-6)
        dims = [0, 2, 3]
        am = 0.8 * am + 0.2 * x.double().mean(dim=dims)
        av = 0.8 * av + 0.2 * x.double().var(dim=dims, unbiased=True)
        info = client.get_session(sid)
        assert info.adapted_batches == i + 1
    for key, value in client.export_state(sid).items():
        assert torch.equal(value, state[key]), key  # the training statistics never moved
    torch.testing.assert_close(info.adapted_mean, am.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info.adapted_var, av.float(), rtol=1e-5, atol=1e-6)
    # plain EVAL still uses the running statistics
    assert torch.equal(client.normalize(sid, xs[0], mode="eval").mean, rm)
    promoted = client.promote_adaptation(sid)
    assert promoted.adapted_batches is None and promoted.version == info.version + 1
    assert torch.equal(promoted.running_mean, info.adapted_mean)
    assert torch.equal(promoted.running_var, info.adapted_var)
    assert promoted.num_batches_tracked == info.num_batches_tracked


def test_reset_adaptation_discards_the_adapted_statistics(client: Client) -> None:
    sid = client.create_session(C).session_id
    version = client.get_session(sid).version
    assert client.reset_adaptation(sid).version == version  # none: nothing changes
    client.normalize(sid, torch.randn(8, C), adapt=0.5, adapt_accumulate=True)
    assert client.get_session(sid).adapted_batches == 1
    reset = client.reset_adaptation(sid)
    assert reset.adapted_batches is None and reset.version == version + 2
    assert reset.adapted_mean is None


def test_recurrent_adaptation_uses_and_folds_the_step_s_slot(client: Client) -> None:
    sid = client.create_session(C, kind="recurrent_batch_norm", time_steps=2).session_id
    for t in range(2):
        client.normalize(sid, torch.randn(8, C) * (t + 1), time_step=t)
    state = client.export_state(sid)
    x = torch.randn(12, C) + 2
    r = client.normalize(sid, x, adapt=0.5, adapt_accumulate=True, time_step=1)
    _, m, _ = _reference(x, state["running_mean"][1], state["running_var"][1], 0.5)
    torch.testing.assert_close(r.mean, m, rtol=1e-6, atol=1e-6)
    info = client.get_session(sid)
    assert info.adapted_mean is not None
    assert torch.equal(info.adapted_mean[0], state["running_mean"][0])
    assert not torch.equal(info.adapted_mean[1], state["running_mean"][1])


def test_adaptation_refusals_change_nothing(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(C, session_id="ad").session_id
    x = torch.randn(8, C)
    with unchanged(client, sid):
        with expect_status(IA, "adaptation: is read with MODE_EVAL only, got MODE_TRAIN"):
            stub.Normalize(_request(sid, x, pb.MODE_TRAIN, adaptation=pb.Adaptation()))
        with expect_status(IA, "adaptation.batch_weight: must be in [0, 1], got 1.5"):
            stub.Normalize(
                _request(sid, x, pb.MODE_EVAL, adaptation=pb.Adaptation(batch_weight=1.5))
            )
        with expect_status(
            FP,
            "session 'ad' has no adapted statistics to promote; send MODE_EVAL calls with "
            "adaptation.accumulate first",
        ):
            stub.PromoteAdaptation(pb.PromoteAdaptationRequest(session_id=sid))
        with expect_status(
            IA,
            "input.shape: batch statistics need more than 1 value per channel, got input size "
            "[1, 4]; nothing was applied",
        ):
            stub.Normalize(
                _request(
                    sid,
                    torch.randn(1, C),
                    pb.MODE_EVAL,
                    adaptation=pb.Adaptation(batch_weight=0.5, accumulate=True),
                )
            )
    gn = client.create_session(C, session_id="gn", kind="group_norm", num_groups=2).session_id
    with expect_status(
        FP,
        "session 'gn' (group norm): adaptation needs batch norm, batch renorm, ghost "
        "batch norm or recurrent batch norm (it keeps no running statistics)",
    ):
        stub.Normalize(_request(gn, x, pb.MODE_EVAL, adaptation=pb.Adaptation(batch_weight=0.5)))


def test_errors_reach_the_client_as_its_own(client: Client) -> None:
    sid = client.create_session(C, session_id="e").session_id
    with pytest.raises(FailedPreconditionError, match="is not calibrating"):
        client.commit_calibration(sid)
    with pytest.raises(InvalidArgumentError, match=r"must be in \[0, 1\]"):
        client.normalize(sid, torch.randn(8, C), adapt=-0.1)


def test_session_messages_carry_the_new_state(stub: pb_grpc.NormalizerStub, client: Client) -> None:
    sid = client.create_session(C).session_id
    client.start_calibration(sid)
    stub.Normalize(_request(sid, torch.randn(5, C), pb.MODE_CALIBRATE))
    client.normalize(sid, torch.randn(8, C), adapt=0.5, adapt_accumulate=True)
    s = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session
    assert s.HasField("calibration") and s.calibration.batches == 1 and s.calibration.samples == 5
    assert s.adapted.batches == 1 and tuple(tensor_from_proto(s.adapted.mean).shape) == (C,)
    bare = stub.GetSession(pb.GetSessionRequest(session_id=sid, omit_tensors=True)).session
    assert bare.adapted.batches == 1 and not bare.adapted.HasField("mean")
    listed = stub.ListSessions(pb.ListSessionsRequest()).sessions[0]
    assert listed.calibration.batches == 1 and not listed.frozen


# ---- durability: the new state is session state, kept by every store


def _server(**settings: object) -> Server:
    base: dict[str, object] = {"address": "127.0.0.1:0", "metrics_address": "off", "device": "cpu"}
    return start_server(Settings(**{**base, **settings}))  # type: ignore[arg-type]


@pytest.mark.parametrize("durability", ["interval", "strict"])
def test_frozen_calibration_and_adapted_survive_a_restart(tmp_path: Path, durability: str) -> None:
    flags = {"state_dir": str(tmp_path), "durability": durability}
    xs = _batches([5, 11, 4])
    with _server(**flags) as srv, Client(srv.address) as client:
        cal = client.create_session(C, session_id="cal").session_id
        client.start_calibration(cal)
        for x in xs[:2]:
            client.normalize(cal, x, mode="calibrate")
        ice = client.create_session(C, session_id="ice").session_id
        client.normalize(ice, torch.randn(8, C), adapt=0.5, adapt_accumulate=True)
        client.freeze(ice)
        before = {sid: client.get_session(sid) for sid in (cal, ice)}
    with _server(**flags) as srv, Client(srv.address) as client:
        after = {sid: client.get_session(sid) for sid in (cal, ice)}
        for sid in (cal, ice):
            a, b = after[sid], before[sid]
            assert (a.version, a.frozen, a.calibration_start, a.calibration_batches) == (
                b.version,
                b.frozen,
                b.calibration_start,
                b.calibration_batches,
            )
            assert a.calibration_samples == b.calibration_samples
            assert a.adapted_batches == b.adapted_batches
        assert after[ice].frozen and after[ice].adapted_batches == 1
        assert torch.equal(after[ice].adapted_mean, before[ice].adapted_mean)
        with pytest.raises(FailedPreconditionError, match="is frozen"):
            client.normalize(ice, torch.randn(8, C))
        # the accumulator came back exact: the calibration goes on where it stopped
        client.normalize(cal, xs[2], mode="calibrate")
        done = client.commit_calibration(cal)
        mean, var = _population(xs)
        _close(done.running_mean, mean)
        _close(done.running_var, var)


def test_a_second_process_on_one_redis_sees_the_new_state(redis_server: RedisServer) -> None:
    with (
        _server(store=redis_server.url) as a,
        _server(store=redis_server.url) as b,
        Client(a.address) as ca,
        Client(b.address) as cb,
    ):
        sid = ca.create_session(C, session_id="shared").session_id
        xs = _batches([6, 9, 7])
        cb.normalize(sid, torch.randn(8, C))  # b's last view: not calibrating
        ca.start_calibration(sid)
        for i, x in enumerate(xs):  # alternating replicas fold into one accumulator
            (ca if i % 2 else cb).normalize(sid, x, mode="calibrate")
        assert cb.get_session(sid).calibration_batches == 3
        done = cb.commit_calibration(sid)
        mean, var = _population(xs)
        _close(done.running_mean, mean)
        _close(done.running_var, var)
        ca.normalize(sid, torch.randn(8, C), mode="eval", adapt=0.5, adapt_accumulate=True)
        assert cb.get_session(sid).adapted_batches == 1
        ca.freeze(sid)
        with pytest.raises(FailedPreconditionError, match="is frozen"):
            cb.normalize(sid, torch.randn(8, C))
        assert cb.get_session(sid).frozen
        ca.unfreeze(sid)  # b's last view is frozen: its next update decides on the store's state
        assert not cb.normalize(sid, torch.randn(8, C)).replayed
        assert cb.freeze(sid).frozen  # and a freeze is not taken for a no-op


def test_a_frozen_synchronized_session_refuses_its_train_steps(client: Client) -> None:
    sid = client.create_session(C, session_id="sync-ice", sync_participants=2).session_id
    client.freeze(sid)
    xs = [torch.randn(4, C), torch.randn(5, C)]
    with unchanged(client, sid), ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(client.normalize, sid, xs[r], sync=(r, 0)) for r in range(2)]
        for f in futures:
            with pytest.raises(FailedPreconditionError) as err:
                f.result(timeout=60)
            assert err.value.message == (
                "session 'sync-ice' is frozen: it refuses to apply TRAIN updates; unfreeze it "
                "first (UnfreezeSession; `normserve session unfreeze sync-ice`)"
            )


def test_the_async_client_calibrates_with_async_with(server: Server) -> None:
    xs = _batches([6, 3])

    async def run() -> tuple[AsyncClient, str]:
        async with AsyncClient(server.address) as ac:
            sid = (await ac.create_session(C)).session_id
            async with ac.calibration(sid) as started:
                assert started.calibrating
                for x in xs:
                    await ac.normalize(sid, x, mode="calibrate")
            with pytest.raises(KeyError):
                async with ac.calibration(sid):
                    await ac.normalize(sid, xs[0], mode="calibrate")
                    raise KeyError("boom")
            info = await ac.get_session(sid)
            assert not info.calibrating and info.calibration_batches == 0
            mean, var = _population(xs)
            _close(info.running_mean, mean)
            _close(info.running_var, var)
            await ac.freeze(sid)
            assert (await ac.get_session(sid)).frozen
            await ac.unfreeze(sid)
            r = await ac.normalize(sid, xs[0], adapt=0.5, adapt_accumulate=True)
            assert r.batch_statistics
            assert (await ac.promote_adaptation(sid)).adapted_batches is None
            assert (await ac.reset_adaptation(sid)).adapted_batches is None
            await ac.start_calibration(sid)
            assert not (await ac.abort_calibration(sid)).calibrating
            return ac, sid

    asyncio.run(run())
