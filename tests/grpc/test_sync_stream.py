"""Synchronized batch norm on streams: chunked TRAIN batches join a step as unary participants
do (mixed with them), under the same rules, each with its exact status code and message."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from normserve.client import Client
from normserve.server import Server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_from_proto, tensor_to_proto
from tests.grpc._util import expect_status, leaving_aborts_the_step, sync_chunks, unchanged


def _answers(stub: pb_grpc.NormalizerStub, reqs: list[pb.NormalizeStreamRequest]) -> list:
    return list(stub.NormalizeStream(iter(reqs), timeout=30))


def _output(answers: list) -> torch.Tensor:
    return torch.cat([tensor_from_proto(a.chunk, "chunk") for a in answers])


@pytest.fixture
def chunky(server: Server) -> Iterator[Client]:
    """A client that sends anything above 256 bytes through NormalizeStream, in chunks."""
    with Client(server.address, timeout=30, chunk_bytes=256) as c:
        yield c


def test_chunked_and_unary_participants_equal_one_batch_norm(
    client: Client, chunky: Client
) -> None:
    """K = 4: ranks 0 and 1 stream two steps on one stream each (batches of several chunks),
    ranks 2 and 3 send unary calls; outputs and running statistics are one BatchNorm's over the
    concatenated batches."""
    k, c, steps = 4, 3, 2
    sid = client.create_session(c, sync_participants=k).session_id
    xs = [[torch.randn(3 + r, c, 4, 4) * 3 + r for r in range(k)] for _ in range(steps)]
    small = [[torch.randn(1, c, 2, 2) + r for r in range(k)] for _ in range(steps)]
    batches = [[xs[s][r] if r < 2 else small[s][r] for r in range(k)] for s in range(steps)]
    assert all(batches[s][r].numel() * 4 > 2 * chunky.chunk_bytes for s in range(2) for r in (0, 1))
    assert all(batches[s][r].numel() * 4 < 256 for s in range(2) for r in (2, 3))
    got: list[list] = [[None] * k for _ in range(steps)]

    def streamed(r: int) -> None:
        for s, res in enumerate(
            chunky.normalize_stream(sid, [batches[0][r], batches[1][r]], sync=(r, 0))
        ):
            got[s][r] = res

    def unary(r: int) -> None:
        for s in range(steps):
            got[s][r] = client.normalize(sid, batches[s][r], sync=(r, s))

    threads = [threading.Thread(target=streamed if r < 2 else unary, args=(r,)) for r in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bn = torch.nn.BatchNorm1d(c, affine=False)  # over every batch's values, [values, C]
    worst = 0.0
    for s in range(steps):
        ref = bn(torch.cat([b.flatten(2).transpose(1, 2).reshape(-1, c) for b in batches[s]]))
        out = torch.cat([g.output.flatten(2).transpose(1, 2).reshape(-1, c) for g in got[s]])
        worst = max(worst, float((out - ref).abs().max()))
        assert {g.version for g in got[s]} == {s + 2}
        assert all(torch.equal(g.mean, got[s][0].mean) for g in got[s])  # the same bits
    state = client.export_state(sid)
    assert int(state["num_batches_tracked"]) == steps
    d_mean = float((state["running_mean"] - bn.running_mean).abs().max())
    d_var = float((state["running_var"] - bn.running_var).abs().max())
    assert worst < 1e-5 and d_mean < 1e-5 and d_var < 1e-5, (worst, d_mean, d_var)


def test_the_rules_on_streams(server: Server, client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(3, sync_participants=2, sync_timeout=0.3).session_id
    x = torch.randn(4, 3)
    with unchanged(client, sid):
        with expect_status(
            grpc.StatusCode.ABORTED,
            f"forward step 0 of session {sid!r}: 1 of 2 participants (ranks 1) did not arrive "
            "within 0.3 seconds; nothing was applied",
        ):
            _answers(stub, sync_chunks(sid, x, 0, 0))
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"sync.rank: must be in [0, 2) for the 2 participants of session {sid!r}, got 2",
        ):
            _answers(stub, sync_chunks(sid, x, 2, 0))
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"mode: session {sid!r} is synchronized over 2 participants: a TRAIN call must name "
            "its rank and step (NormalizeRequest.sync, or NormalizeStreamRequest.sync on a "
            "stream)",
        ):
            _answers(stub, sync_chunks(sid, x, None, 0))
        reqs = sync_chunks(sid, x, 0, 0)
        reqs[2].sync.CopyFrom(pb.SyncStep(rank=1, step=0))
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "sync: a later chunk of batch 0 names rank 1 and step 0, the first named rank 0 and "
            "step 0; nothing of that batch was applied",
        ):
            _answers(stub, reqs)
    plain = client.create_session(3).session_id
    with expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"sync: session {plain!r} is not synchronized (its config has no sync group); send no sync",
    ):
        _answers(stub, sync_chunks(plain, x, 0, 0))
    # a unary rank 0 waits at step 1; a stream claiming rank 0 too is refused
    pending = stub.Normalize.future(
        pb.NormalizeRequest(
            session_id=sid,
            mode=pb.MODE_TRAIN,
            input=tensor_to_proto(x),
            sync=pb.SyncStep(rank=0, step=1),
        ),
        timeout=10,
    )
    time.sleep(0.05)
    with expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"sync.rank: rank 0 already arrived at forward step 1 of session {sid!r}, which is still "
        "waiting for others: each participant needs a rank of its own",
    ):
        _answers(stub, sync_chunks(sid, x, 0, 1))
    second = _answers(stub, sync_chunks(sid, x, 1, 1, rows=3))  # chunks of 3 and 1 rows
    first = pending.result()
    assert len(second) == 2 and second[-1].end_of_batch
    assert first.version == second[0].version == 2 and not second[0].replayed
    assert first.mean == second[0].mean
    retry = _answers(stub, sync_chunks(sid, x, 1, 1))
    assert retry[0].replayed and retry[0].version == 2 and retry[0].mean == second[0].mean
    assert torch.equal(_output(retry), _output(second))
    assert client.get_session(sid).version == 2
    with expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"sync.step: step 0 of session {sid!r} is stale: step 1 has completed, and only the last "
        "8 completed steps are answered again",
    ):
        _answers(stub, sync_chunks(sid, x, 0, 0))


def test_a_stream_whose_client_leaves_fails_the_step_at_once(
    server: Server, client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(3, sync_participants=3, sync_timeout=60).session_id
    x = torch.randn(4, 3)
    waiting = stub.Normalize.future(
        pb.NormalizeRequest(
            session_id=sid,
            mode=pb.MODE_TRAIN,
            input=tensor_to_proto(x),
            sync=pb.SyncStep(rank=0, step=0),
        ),
        timeout=30,
    )
    leaving = stub.NormalizeStream(iter(sync_chunks(sid, x, 1, 0)), timeout=30)
    leaving_aborts_the_step(client, sid, waiting, leaving)
    # the step runs again, streamed and unary together
    again = stub.Normalize.future(
        pb.NormalizeRequest(
            session_id=sid,
            mode=pb.MODE_TRAIN,
            input=tensor_to_proto(x),
            sync=pb.SyncStep(rank=0, step=0),
        ),
        timeout=30,
    )
    streams = [stub.NormalizeStream(iter(sync_chunks(sid, x, r, 0)), timeout=30) for r in (1, 2)]
    answers = [list(s) for s in streams]
    assert again.result().version == 2 and {a[0].version for a in answers} == {2}


def test_async_client_streams_participants(server: Server) -> None:
    from normserve.client import AsyncClient

    async def main() -> None:
        async with AsyncClient(server.address, chunk_bytes=64) as ac:
            sid = (await ac.create_session(3, sync_participants=3)).session_id
            xs = [torch.randn(6 + r, 3) * 2 - 1 for r in range(3)]

            async def one(r: int) -> object:
                answers = [res async for res in ac.normalize_stream(sid, [xs[r]], sync=(r, 5))]
                assert len(answers) == 1
                return answers[0]

            results = await asyncio.gather(*(one(r) for r in range(3)))
            ref = torch.nn.functional.batch_norm(torch.cat(xs), None, None, training=True)
            out = torch.cat([r.output for r in results])  # type: ignore[attr-defined]
            assert (out - ref).abs().max() < 1e-5
            # normalize() streams a batch larger than chunk_bytes, and it joins its step too
            big = await asyncio.gather(*(ac.normalize(sid, xs[r], sync=(r, 6)) for r in range(3)))
            assert {b.version for b in big} == {3}
            assert (torch.cat([b.output for b in big]) - ref).abs().max() < 1e-5

    asyncio.run(main())


def test_remote_sync_batch_norm_with_chunked_ranks(server: Server, chunky: Client) -> None:
    """RemoteSyncBatchNorm2d through a client that streams every batch above 256 bytes: ranks
    of 2 to 4 samples join their steps on streams, rank 0 (1 sample) unary; outputs, running
    statistics and gradients are one BatchNorm2d's."""
    from tests.client.test_sync_modules import _compare, _rank

    sizes = [1, 2, 3, 4]
    got: list = [None] * 4

    def run(r: int) -> None:
        got[r] = _rank(None, "sync-chunked", r, sizes, chunky)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g is not None for g in got)
    worst = _compare(sizes, got, chunky, "sync-chunked")
    assert max(v for key, v in worst.items() if not key.endswith("_abs")) < 1e-5, worst
