"""Calibration and adaptation batches on NormalizeStream, through real gRPC: a batch sent in chunks
is answered, and changes the session, exactly as the concatenated batch sent to Normalize; every
refusal's status and message, with the session unchanged after it."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from normserve.client import AsyncClient, Client
from normserve.client._tensors import rows_per_chunk
from normserve.server import Server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_from_proto, tensor_to_proto
from tests.grpc._util import expect_status, unchanged

FP = grpc.StatusCode.FAILED_PRECONDITION
IA = grpc.StatusCode.INVALID_ARGUMENT
C = 4
CHUNK = 1024  # bytes: every batch below goes in several chunks


def _batches(
    sizes: list[int], dtype: torch.dtype = torch.float32, spatial: tuple[int, ...] = (3, 2)
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [
        (torch.randn(n, C, *spatial, generator=g, dtype=torch.float64) * 3 + 5).to(dtype)
        for n in sizes
    ]


def _chunks(
    sid: str, x: torch.Tensor, mode: int, rows: int, **first: object
) -> list[pb.NormalizeStreamRequest]:
    """One batch as raw stream requests of ``rows`` rows each; ``first``: the first's fields."""
    out = []
    starts = list(range(0, x.shape[0], rows))
    for i, start in enumerate(starts):
        req = (
            pb.NormalizeStreamRequest(session_id=sid, mode=mode, **first)  # type: ignore[arg-type]
            if i == 0
            else pb.NormalizeStreamRequest()
        )
        tensor_to_proto(x[start : start + rows], req.chunk)
        req.end_of_batch = i == len(starts) - 1
        out.append(req)
    return out


def _accumulator(server: Server, sid: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The session's calibration accumulator (count, mean, M2), read from the server's state."""
    c = server.service.sessions.get(sid).read_state(touch=False).calibration
    assert c is not None
    return c.count, c.mean, c.m2


def _small(server: Server) -> Client:
    return Client(server.address, chunk_bytes=CHUNK, timeout=30)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"kind": "ghost_batch_norm", "ghost_batch_size": 4},
        {"kind": "batch_renorm"},
        {"kind": "recurrent_batch_norm", "time_steps": 2},
    ],
)
def test_chunked_calibration_equals_unary(
    server: Server, client: Client, dtype: torch.dtype, kwargs: dict[str, object]
) -> None:
    xs = _batches([13, 30, 17], dtype)
    assert all(rows_per_chunk(x, CHUNK) < x.shape[0] for x in xs)  # really chunked
    step = 1 if kwargs.get("kind") == "recurrent_batch_norm" else 0
    unary = client.create_session(C, affine=True, **kwargs).session_id  # type: ignore[arg-type]
    streamed = client.create_session(C, affine=True, **kwargs).session_id  # type: ignore[arg-type]
    client.start_calibration(unary)
    client.start_calibration(streamed)
    want = [client.normalize(unary, x, mode="calibrate", time_step=step) for x in xs]
    with _small(server) as small:
        got = list(small.normalize_stream(streamed, xs, mode="calibrate", time_step=step))
    for g, w in zip(got, want, strict=True):
        assert g.batch_statistics and not g.replayed
        torch.testing.assert_close(g.output, w.output, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.mean, w.mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(g.var, w.var, rtol=1e-6, atol=0)
    # float64 batches: the accumulator to float64 rounding; float32 ones: their chunk sums are
    # float32 (ops.moments), so to float32 rounding
    rel = 1e-12 if dtype == torch.float64 else 1e-6
    (cu, mu, m2u), (cs, ms, m2s) = _accumulator(server, unary), _accumulator(server, streamed)
    assert torch.equal(cu, cs)
    torch.testing.assert_close(ms, mu, rtol=rel, atol=0)
    torch.testing.assert_close(m2s, m2u, rtol=rel, atol=0)
    info = client.get_session(streamed)
    assert (info.calibration_batches, info.calibration_samples) == (3, 60)
    a, b = client.commit_calibration(unary), client.commit_calibration(streamed)
    torch.testing.assert_close(b.running_mean, a.running_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-6, atol=0)
    assert b.version == a.version


@pytest.mark.parametrize(("a", "accumulate"), [(0.3, False), (0.3, True), (1.0, True)])
def test_chunked_adaptation_equals_unary(
    server: Server, client: Client, a: float, accumulate: bool
) -> None:
    sids = [client.create_session(C, momentum=0.2).session_id for _ in range(2)]
    for sid in sids:  # trained alike: equal running statistics
        for x in _batches([8, 9]):
            client.normalize(sid, x, idempotency_key=None)
    unary, streamed = sids
    xs = [x * 2 - 1 for x in _batches([21, 40, 11])]
    want = [client.normalize(unary, x, adapt=a, adapt_accumulate=accumulate) for x in xs]
    with _small(server) as small:
        got = list(small.normalize_stream(streamed, xs, adapt=a, adapt_accumulate=accumulate))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.output, w.output, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.mean, w.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g.var, w.var, rtol=1e-6, atol=0)
        assert g.batch_statistics and g.version == w.version
    iu, is_ = client.get_session(unary), client.get_session(streamed)
    assert is_.adapted_batches == iu.adapted_batches == (3 if accumulate else None)
    if accumulate:
        torch.testing.assert_close(is_.adapted_mean, iu.adapted_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(is_.adapted_var, iu.adapted_var, rtol=1e-6, atol=0)
    assert torch.equal(is_.running_mean, iu.running_mean)  # never moved by adaptation
    assert torch.equal(is_.running_var, iu.running_var)


def test_stream_refusals_change_nothing(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    x = _batches([12])[0]
    sid = client.create_session(C, session_id="cal").session_id
    with unchanged(client, sid):
        with expect_status(
            FP,
            "session 'cal' is not calibrating: a MODE_CALIBRATE batch needs StartCalibration first "
            "(`normserve session calibrate-start cal`)",
        ):
            list(stub.NormalizeStream(iter(_chunks(sid, x, pb.MODE_CALIBRATE, 5))))
        with expect_status(IA, "adaptation: is read with MODE_EVAL only, got MODE_TRAIN"):
            adapt = pb.Adaptation(batch_weight=0.5)
            list(stub.NormalizeStream(iter(_chunks(sid, x, pb.MODE_TRAIN, 5, adaptation=adapt))))
        with expect_status(IA, "adaptation.batch_weight: must be in [0, 1], got 1.5"):
            adapt = pb.Adaptation(batch_weight=1.5)
            list(stub.NormalizeStream(iter(_chunks(sid, x, pb.MODE_EVAL, 5, adaptation=adapt))))
        with expect_status(
            IA,
            "chunk.shape: batch statistics need more than 1 value per channel, got input size "
            "[1, 4]; nothing was applied",
        ):
            adapt = pb.Adaptation(batch_weight=0.5, accumulate=True)
            one = torch.randn(1, C)
            list(stub.NormalizeStream(iter(_chunks(sid, one, pb.MODE_EVAL, 1, adaptation=adapt))))
    client.start_calibration(sid)
    # the calibration ends between the batch's first chunk and its last: refused at its end
    reqs = _chunks(sid, x, pb.MODE_CALIBRATE, 5)

    def aborting() -> object:
        yield reqs[0]
        client.abort_calibration(sid)
        yield from reqs[1:]

    with expect_status(
        FP,
        "session 'cal' is not calibrating: a MODE_CALIBRATE batch needs StartCalibration first "
        "(`normserve session calibrate-start cal`)",
    ):
        list(stub.NormalizeStream(aborting()))
    assert not client.get_session(sid).calibrating
    client.start_calibration(sid)
    client.freeze(sid)
    with unchanged(client, sid):
        with expect_status(
            FP,
            "session 'cal' is frozen: it refuses to fold in calibration batches; unfreeze it "
            "first (UnfreezeSession; `normserve session unfreeze cal`)",
        ):
            list(stub.NormalizeStream(iter(_chunks(sid, x, pb.MODE_CALIBRATE, 5))))
        with expect_status(
            FP,
            "session 'cal' is frozen: it refuses to fold EVAL batches into adapted statistics; "
            "unfreeze it first (UnfreezeSession; `normserve session unfreeze cal`)",
        ):
            adapt = pb.Adaptation(batch_weight=0.5, accumulate=True)
            list(stub.NormalizeStream(iter(_chunks(sid, x, pb.MODE_EVAL, 5, adaptation=adapt))))
    assert client.get_session(sid).calibration_batches == 0
    ln = client.create_session(0, session_id="ln", kind="layer_norm", normalized_shape=(C,))
    with (
        unchanged(client, ln.session_id),
        expect_status(
            FP,
            "session 'ln' (layer norm): a MODE_CALIBRATE batch needs batch norm, batch renorm, ghost "
            "batch norm or recurrent batch norm (it keeps no running statistics)",
        ),
    ):
        list(stub.NormalizeStream(iter(_chunks("ln", torch.randn(6, C), pb.MODE_CALIBRATE, 2))))


def test_a_chunk_disagreeing_in_adaptation_is_refused(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    x = _batches([12])[0]
    sid = client.create_session(C, session_id="ad").session_id
    first = pb.Adaptation(batch_weight=0.5, accumulate=True)
    # a later chunk repeating the first's adaptation is fine
    reqs = _chunks(sid, x, pb.MODE_EVAL, 5, adaptation=first)
    reqs[1].adaptation.CopyFrom(first)
    assert len(list(stub.NormalizeStream(iter(reqs)))) == 3
    assert client.get_session(sid).adapted_batches == 1
    for other, message in (
        (
            pb.Adaptation(batch_weight=0.25, accumulate=True),
            "adaptation: a later chunk of batch 0 names batch_weight 0.25 and accumulate True, "
            "the first named batch_weight 0.5 and accumulate True; nothing of that batch was "
            "applied",
        ),
        (
            pb.Adaptation(batch_weight=0.5),
            "adaptation: a later chunk of batch 0 names batch_weight 0.5 and accumulate False, "
            "the first named batch_weight 0.5 and accumulate True; nothing of that batch was "
            "applied",
        ),
    ):
        reqs = _chunks(sid, x, pb.MODE_EVAL, 5, adaptation=first)
        reqs[2].adaptation.CopyFrom(other)
        with unchanged(client, sid), expect_status(IA, message):
            list(stub.NormalizeStream(iter(reqs)))
    reqs = _chunks(sid, x, pb.MODE_EVAL, 5)
    reqs[1].adaptation.CopyFrom(first)
    with (
        unchanged(client, sid),
        expect_status(
            IA,
            "adaptation: a later chunk of batch 0 names batch_weight 0.5 and accumulate True, the "
            "first named none; nothing of that batch was applied",
        ),
    ):
        list(stub.NormalizeStream(iter(reqs)))
    assert client.get_session(sid).adapted_batches == 1


def test_a_streamed_calibration_batch_applies_once_per_key(server: Server, client: Client) -> None:
    sid = client.create_session(C).session_id
    x = _batches([30])[0]
    client.start_calibration(sid)
    with _small(server) as small:
        first = next(
            small.normalize_stream(sid, [x], mode="calibrate", idempotency_keys=iter(["k"]))
        )
        again = next(
            small.normalize_stream(sid, [x], mode="calibrate", idempotency_keys=iter(["k"]))
        )
    assert not first.replayed and again.replayed and again.version == first.version
    torch.testing.assert_close(again.output, first.output, rtol=0, atol=0)
    # the same request sent unary with that key: the same fingerprint, a replay too
    unary = client.normalize(sid, x, mode="calibrate", idempotency_key="k")
    assert unary.replayed and unary.version == first.version
    info = client.get_session(sid)
    assert (info.calibration_batches, info.calibration_samples) == (1, 30)
    assert info.version == first.version
    with _small(server) as small:  # an accumulating adaptation batch, likewise
        ad = [
            next(
                small.normalize_stream(
                    sid, [x], adapt=0.5, adapt_accumulate=True, idempotency_keys=iter(["a"])
                )
            )
            for _ in range(2)
        ]
    assert not ad[0].replayed and ad[1].replayed and ad[1].version == ad[0].version
    assert client.get_session(sid).adapted_batches == 1


def test_normalize_streams_large_calibration_and_adaptation_batches(server: Server) -> None:
    """Larger than chunk_bytes: streamed, as a TRAIN batch is; no longer refused past one message."""
    x = torch.randn(4096, C, dtype=torch.float64) * 2 + 1  # 128 KiB
    with (
        Client(server.address, timeout=30) as big,
        Client(server.address, chunk_bytes=4096, max_message_bytes=32768, timeout=30) as small,
    ):
        unary, streamed = (big.create_session(C).session_id for _ in range(2))
        big.start_calibration(unary)
        small.start_calibration(streamed)
        w = big.normalize(unary, x, mode="calibrate")
        g = small.normalize(streamed, x, mode="calibrate")
        torch.testing.assert_close(g.output, w.output, rtol=1e-6, atol=1e-6)
        assert small.get_session(streamed).calibration_batches == 1
        wa = big.normalize(unary, x, adapt=0.5, adapt_accumulate=True)
        ga = small.normalize(streamed, x, adapt=0.5, adapt_accumulate=True)
        torch.testing.assert_close(ga.output, wa.output, rtol=1e-6, atol=1e-6)
        assert small.get_session(streamed).adapted_batches == 1
        a, b = big.commit_calibration(unary), small.commit_calibration(streamed)
        torch.testing.assert_close(b.running_mean, a.running_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-6, atol=0)


def test_the_async_client_streams_calibration_and_adaptation(server: Server) -> None:
    xs = _batches([25, 9])

    async def main() -> None:
        async with (
            AsyncClient(server.address, timeout=30) as big,
            AsyncClient(server.address, chunk_bytes=CHUNK, timeout=30) as small,
        ):
            unary = (await big.create_session(C)).session_id
            streamed = (await big.create_session(C)).session_id
            await big.start_calibration(unary)
            await big.start_calibration(streamed)
            want = [await big.normalize(unary, x, mode="calibrate") for x in xs]
            got = [r async for r in small.normalize_stream(streamed, xs, mode="calibrate")]
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g.output, w.output, rtol=1e-6, atol=1e-6)
            one = await small.normalize(streamed, torch.cat(xs), mode="calibrate")  # > chunk
            assert one.output.shape == (34, C, 3, 2)
            assert (await big.get_session(streamed)).calibration_batches == 3
            await big.abort_calibration(streamed)
            await big.abort_calibration(unary)
            wa = [await big.normalize(unary, x, adapt=0.4, adapt_accumulate=True) for x in xs]
            ga = [
                r
                async for r in small.normalize_stream(
                    streamed, xs, adapt=0.4, adapt_accumulate=True
                )
            ]
            for g, w in zip(ga, wa, strict=True):
                torch.testing.assert_close(g.output, w.output, rtol=1e-6, atol=1e-6)
            iu, is_ = await big.get_session(unary), await big.get_session(streamed)
            assert is_.adapted_batches == iu.adapted_batches == 2
            assert is_.adapted_mean is not None and iu.adapted_mean is not None
            torch.testing.assert_close(is_.adapted_mean, iu.adapted_mean, rtol=1e-6, atol=1e-7)

    asyncio.run(main())


def test_stream_answers_carry_the_batch_statistics(
    stub: pb_grpc.NormalizerStub, client: Client
) -> None:
    """statistics_only on a streamed calibration batch: one answer, folded in all the same."""
    sid = client.create_session(C).session_id
    client.start_calibration(sid)
    x = _batches([12])[0]
    answers = list(
        stub.NormalizeStream(iter(_chunks(sid, x, pb.MODE_CALIBRATE, 5, statistics_only=True)))
    )
    assert len(answers) == 1 and answers[0].end_of_batch and not answers[0].HasField("chunk")
    dims = [0, 2, 3]
    torch.testing.assert_close(
        tensor_from_proto(answers[0].mean), x.double().mean(dim=dims).float(), rtol=1e-6, atol=0
    )
    assert client.get_session(sid).calibration_batches == 1


def test_recalibrate_streams_activations_larger_than_chunk_bytes(server: Server) -> None:
    """A model's activations past one message (the client's max_message_bytes) go on streams and
    calibrate as unary calls would (they used to be refused with ValueError)."""
    from torch import nn

    from normserve.client import RemoteBatchNorm2d, recalibrate

    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 2, 5, 5, generator=g) * 2 + 1 for n in (20, 30, 16)]
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        acts = [conv(x) for x in batches]
    assert all(a.numel() * 4 > 4096 for a in acts)  # each one past a message
    flat = torch.cat([a.double().transpose(0, 1).reshape(3, -1) for a in acts], 1)
    with Client(server.address, chunk_bytes=CHUNK, max_message_bytes=4096, timeout=30) as small:
        model = nn.Sequential(conv, RemoteBatchNorm2d(3, client=small))
        info = recalibrate(model, batches)["1"]
    torch.testing.assert_close(info.running_mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(info.running_var.double(), flat.var(1), rtol=1e-5, atol=1e-6)


def test_a_ghost_calibration_batch_answers_whole_batch_statistics_of_any_size() -> None:
    """A ghost batch norm TRAIN batch answers per-virtual-batch statistics, which grow with the
    batch and may not fit an answer; a calibration or adapting batch answers [C]: never refused
    for that (its chunks fit)."""
    from normserve.client import ResourceExhaustedError
    from tests.grpc._util import serving

    x = torch.randn(2000, C)  # 1000 virtual batches of 2: 32000 bytes of per-batch statistics
    with serving(max_message_bytes=16384) as srv, Client(srv.address, chunk_bytes=5120) as client:
        sid = client.create_session(C, kind="ghost_batch_norm", ghost_batch_size=2).session_id
        with unchanged(client, sid), pytest.raises(ResourceExhaustedError):
            client.normalize(sid, x)  # TRAIN: refused, as documented for growing statistics
        client.start_calibration(sid)
        r = client.normalize(sid, x, mode="calibrate")
        assert r.mean.shape == (C,) and r.output.shape == x.shape
        a = client.normalize(sid, x, adapt=0.5)
        assert a.mean.shape == (C,) and a.output.shape == x.shape
        assert client.get_session(sid).calibration_batches == 1
