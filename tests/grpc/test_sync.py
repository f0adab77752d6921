"""Synchronized batch norm over gRPC: K = 64 participants on a default server (16 workers), and
each rule's status code and message."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from normserve.client import Client
from normserve.server import Server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_from_proto, tensor_to_proto
from tests.grpc._util import expect_status, sync_request, unchanged


def test_64_participants_on_a_default_server_equal_one_batch_norm(
    server: Server, client: Client
) -> None:
    k, c = 64, 8
    sid = client.create_session(c, sync_participants=k).session_id
    bn = torch.nn.BatchNorm2d(c, affine=False)
    worst, times = 0.0, []
    with ThreadPoolExecutor(k) as pool:
        for step in range(3):
            xs = [torch.randn(1 + r % 3, c, 4, 4) * 2 + 5 for r in range(k)]
            t0 = time.perf_counter()
            results = list(
                pool.map(
                    lambda r: client.normalize(sid, xs[r], sync=(r, step)),  # noqa: B023
                    range(k),
                )
            )
            times.append(time.perf_counter() - t0)
            ref = bn(torch.cat(xs))
            out = torch.cat([r.output for r in results])
            worst = max(worst, float((out - ref).abs().max()))
            assert {r.version for r in results} == {step + 2}
    state = client.export_state(sid)
    d_mean = float((state["running_mean"] - bn.running_mean).abs().max())
    d_var = float((state["running_var"] - bn.running_var).abs().max())
    assert int(state["num_batches_tracked"]) == 3
    print(
        f"\nK=64 unary steps: worst output diff {worst:.2e}, running mean {d_mean:.2e}, "
        f"var {d_var:.2e}; step times {', '.join(f'{t * 1e3:.0f} ms' for t in times)}"
    )
    assert worst < 1e-5 and d_mean < 1e-5 and d_var < 1e-5


def test_the_rules_as_status_codes(server: Server, client: Client) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.NormalizerStub(channel)
    sid = client.create_session(3, sync_participants=2, sync_timeout=0.3).session_id
    x = torch.randn(4, 3)
    with unchanged(client, sid):
        with expect_status(
            grpc.StatusCode.ABORTED,
            f"forward step 0 of session {sid!r}: 1 of 2 participants (ranks 1) did not arrive "
            "within 0.3 seconds; nothing was applied",
        ):
            stub.Normalize(sync_request(sid, x, 0, 0), timeout=10)
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"sync.rank: must be in [0, 2) for the 2 participants of session {sid!r}, got 2",
        ):
            stub.Normalize(sync_request(sid, x, 2, 0), timeout=10)
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"sync: session {sid!r} is synchronized over 2 participants: a TRAIN call must name "
            "its rank and step (NormalizeRequest.sync, or NormalizeStreamRequest.sync on a "
            "stream)",
        ):
            stub.Normalize(
                pb.NormalizeRequest(session_id=sid, mode=pb.MODE_TRAIN, input=tensor_to_proto(x)),
                timeout=10,
            )
    pending = stub.Normalize.future(sync_request(sid, x, 0, 1), timeout=10)
    time.sleep(0.05)
    with expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"sync.rank: rank 0 already arrived at forward step 1 of session {sid!r}, which is still "
        "waiting for others: each participant needs a rank of its own",
    ):
        stub.Normalize(sync_request(sid, x, 0, 1), timeout=10)
    second = stub.Normalize(sync_request(sid, x, 1, 1), timeout=10)
    first = pending.result()
    assert first.version == second.version == 2
    retry = stub.Normalize(sync_request(sid, x, 1, 1), timeout=10)
    assert retry.replayed and retry.version == 2 and retry.mean == second.mean
    assert client.get_session(sid).version == 2
    with expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"sync.step: step 0 of session {sid!r} is stale: step 1 has completed, and only the last "
        "8 completed steps are answered again",
    ):
        stub.Normalize(sync_request(sid, x, 0, 0), timeout=10)
    channel.close()


def test_a_dying_participant_fails_the_step_at_once(server: Server, client: Client) -> None:
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.NormalizerStub(channel)
    sid = client.create_session(3, sync_participants=3, sync_timeout=60).session_id
    x = torch.randn(4, 3)
    waiting = stub.Normalize.future(sync_request(sid, x, 0, 0), timeout=30)
    dying = stub.Normalize.future(sync_request(sid, x, 1, 0), timeout=30)
    time.sleep(0.1)
    t0 = time.perf_counter()
    dying.cancel()  # its client gives up (or dies: the server sees the same cancellation)
    with expect_status(
        grpc.StatusCode.ABORTED,
        f"participant 1 left forward step 0 of session {sid!r} (its call was cancelled); "
        "nothing was applied, send the step again",
    ):
        waiting.result()
    assert time.perf_counter() - t0 < 5  # not the 60 s timeout
    assert client.get_session(sid).version == 1
    # the group is not wedged: the step runs again with all three
    done = [stub.Normalize.future(sync_request(sid, x, r, 0), timeout=30) for r in range(3)]
    assert {f.result().version for f in done} == {2}
    channel.close()


def test_sync_reduce_over_grpc(server: Server, client: Client) -> None:
    sid = client.create_session(3, sync_participants=2).session_id
    parts = [(torch.randn(3), torch.randn(3), 4), (torch.randn(3), torch.randn(3), 6)]
    got: list[object] = [None, None]

    def reduce(r: int) -> None:
        got[r] = client.sync_reduce(sid, (r, 0), *parts[r])

    threads = [threading.Thread(target=reduce, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g in got:
        assert g.count == 10  # type: ignore[attr-defined]
        torch.testing.assert_close(g.sum_dy, parts[0][0] + parts[1][0])  # type: ignore[attr-defined]
    channel = grpc.insecure_channel(server.address)
    stub = pb_grpc.NormalizerStub(channel)
    with expect_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "sync: a SyncReduce call needs the rank and step it reduces",
    ):
        stub.SyncReduce(pb.SyncReduceRequest(session_id=sid), timeout=10)
    reply = stub.SyncReduce(
        pb.SyncReduceRequest(
            session_id=sid,
            sync=pb.SyncStep(rank=0, step=0),
            sum_dy=tensor_to_proto(parts[0][0]),
            sum_dy_xhat=tensor_to_proto(parts[0][1]),
            count=4,
        ),
        timeout=10,
    )
    assert reply.replayed and torch.equal(tensor_from_proto(reply.sum_dy, "s"), got[0].sum_dy)  # type: ignore[attr-defined]
    channel.close()


def test_session_shows_its_group(client: Client) -> None:
    info = client.create_session(3, sync_participants=4, sync_timeout=5)
    assert (info.sync_participants, info.sync_timeout) == (4, 5.0)
    assert client.get_session(info.session_id).sync_participants == 4
    plain = client.create_session(3)
    assert (plain.sync_participants, plain.sync_timeout) == (0, None)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"participants": 1}, "config.sync.participants: must be between 2 and 4096, got 1"),
        ({"participants": 0}, "config.sync.participants: must be between 2 and 4096, got 0"),
        (
            {"participants": 2, "timeout_seconds": -1},
            "config.sync.timeout_seconds: must be in (0, 3600], got -1.0",
        ),
    ],
)
def test_bad_groups_are_refused(stub: pb_grpc.NormalizerStub, fields: dict, message: str) -> None:
    cfg = pb.SessionConfig(num_features=3, sync=pb.SyncGroup(**fields))
    with expect_status(grpc.StatusCode.INVALID_ARGUMENT, message):
        stub.CreateSession(pb.CreateSessionRequest(config=cfg), timeout=10)


def test_async_client_participants(server: Server) -> None:
    from normserve.client import AsyncClient

    async def main() -> None:
        async with AsyncClient(server.address) as ac:
            sid = (await ac.create_session(3, sync_participants=8)).session_id
            xs = [torch.randn(2, 3) for _ in range(8)]
            results = await asyncio.gather(
                *(ac.normalize(sid, x, sync=(r, 0)) for r, x in enumerate(xs))
            )
            ref = torch.nn.functional.batch_norm(torch.cat(xs), None, None, training=True)
            assert (torch.cat([r.output for r in results]) - ref).abs().max() < 1e-5
            sums = await asyncio.gather(
                *(ac.sync_reduce(sid, (r, 0), torch.ones(3), torch.ones(3), 2) for r in range(8))
            )
            assert {s.count for s in sums} == {16}
            assert all(torch.equal(s.sum_dy, torch.full((3,), 8.0)) for s in sums)

    asyncio.run(main())
