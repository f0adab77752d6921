"""Synchronized sessions across replicas: two servers sharing one Redis store, the participants
of a step spread over both. The same rules as in one process, with their exact messages."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from normserve.client import Client
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_from_proto
from tests._redis import RedisServer
from tests.client.test_sync_modules import _compare, _rank
from tests.grpc._util import (
    expect_status,
    leaving_aborts_the_step,
    sync_chunks,
    sync_request,
    unchanged,
)


def _server(url: str) -> Server:
    return start_server(
        Settings(address="127.0.0.1:0", metrics_address="off", device="cpu", store=url)
    )


@pytest.fixture
def pair(redis_server: RedisServer) -> Iterator[tuple[Server, Server]]:
    a, b = _server(redis_server.url), _server(redis_server.url)
    yield a, b
    a.stop(0)
    b.stop(0)


@pytest.fixture
def stubs(pair: tuple[Server, Server]) -> Iterator[tuple[pb_grpc.NormalizerStub, ...]]:
    channels = [grpc.insecure_channel(s.address) for s in pair]
    yield tuple(pb_grpc.NormalizerStub(c) for c in channels)
    for c in channels:
        c.close()


def test_four_participants_on_two_replicas_equal_one_batch_norm(
    pair: tuple[Server, Server],
) -> None:
    """K = 4 (ranks 0 and 2 on one server, 1 and 3 on the other), rank 3 streaming its batch in
    chunks: outputs and running statistics are one BatchNorm's over the concatenated batches."""
    k, c, steps = 4, 3, 3
    with (
        Client(pair[0].address, timeout=30) as ca,
        Client(pair[1].address, timeout=30, chunk_bytes=256) as cb,
    ):
        sid = ca.create_session(c, sync_participants=k).session_id
        clients = [ca, cb, ca, cb]
        batches = [[torch.randn(1 + r, c, 4, 4) * 2 + 5 for r in range(k)] for _ in range(steps)]
        assert batches[0][3].numel() * 4 > 2 * cb.chunk_bytes  # rank 3's batches are chunked
        got: list[list] = [[None] * k for _ in range(steps)]

        def run(r: int) -> None:
            for s in range(steps):
                got[s][r] = clients[r].normalize(sid, batches[s][r], sync=(r, s))

        threads = [threading.Thread(target=run, args=(r,)) for r in range(k)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        bn = torch.nn.BatchNorm2d(c, affine=False)
        worst = 0.0
        for s in range(steps):
            ref = bn(torch.cat(batches[s]))
            worst = max(worst, float((torch.cat([g.output for g in got[s]]) - ref).abs().max()))
            assert {g.version for g in got[s]} == {s + 2}
            assert all(torch.equal(g.mean, got[s][0].mean) for g in got[s])  # the same bits
            assert not any(g.replayed for g in got[s])
        for client in (ca, cb):
            state = client.export_state(sid)
            assert int(state["num_batches_tracked"]) == steps
            d_mean = float((state["running_mean"] - bn.running_mean).abs().max())
            d_var = float((state["running_var"] - bn.running_var).abs().max())
            assert worst < 1e-5 and d_mean < 1e-5 and d_var < 1e-5, (worst, d_mean, d_var)
        print(
            f"\nK=4 over two replicas on one Redis: worst output diff {worst:.2e}, running "
            f"mean {d_mean:.2e}, var {d_var:.2e}; {elapsed / steps * 1e3:.0f} ms a step"
        )


def test_remote_sync_batch_norm_over_two_replicas(pair: tuple[Server, Server]) -> None:
    """Forward and backward (SyncReduce) of RemoteSyncBatchNorm2d, ranks alternating between
    the two servers: outputs, running statistics and gradients of one BatchNorm2d."""
    sizes = [1, 2, 3, 4]
    sid = "sync-redis-k4"
    with Client(pair[0].address, timeout=30) as ca, Client(pair[1].address, timeout=30) as cb:
        clients = [ca, cb, ca, cb]
        got: list = [None] * 4

        def run(r: int) -> None:
            got[r] = _rank(None, sid, r, sizes, clients[r])

        threads = [threading.Thread(target=run, args=(r,)) for r in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(g is not None for g in got)
        worst = _compare(sizes, got, cb, sid)
        assert max(v for key, v in worst.items() if not key.endswith("_abs")) < 1e-5, worst


def test_the_rules_across_replicas(
    pair: tuple[Server, Server], stubs: tuple[pb_grpc.NormalizerStub, ...]
) -> None:
    a, b = stubs
    with Client(pair[0].address, timeout=30) as client:
        sid = client.create_session(3, sync_participants=2, sync_timeout=0.5).session_id
        x, y = torch.randn(4, 3), torch.randn(4, 3)
        timed_out = (
            f"forward step 0 of session {sid!r}: 1 of 2 participants (ranks 1) did not arrive "
            "within 0.5 seconds; nothing was applied"
        )
        with unchanged(client, sid):
            with expect_status(grpc.StatusCode.ABORTED, timed_out):
                a.Normalize(sync_request(sid, x, 0, 0), timeout=10)
            # the missing rank, late, on the other replica: the step was aborted for it too
            with expect_status(grpc.StatusCode.ABORTED, timed_out):
                b.Normalize(sync_request(sid, y, 1, 0), timeout=10)
            with expect_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"sync.rank: must be in [0, 2) for the 2 participants of session {sid!r}, got 2",
            ):
                b.Normalize(sync_request(sid, x, 2, 0), timeout=10)
        # rank 0 waits on one replica; rank 0 again (another batch) on the other is refused
        pending = a.Normalize.future(sync_request(sid, x, 0, 1), timeout=10)
        time.sleep(0.1)
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"sync.rank: rank 0 already arrived at forward step 1 of session {sid!r}, which is "
            "still waiting for others: each participant needs a rank of its own",
        ):
            b.Normalize(sync_request(sid, y, 0, 1), timeout=10)
        second = b.Normalize(sync_request(sid, y, 1, 1), timeout=10)
        first = pending.result()
        assert first.version == second.version == 2 and first.mean == second.mean
        # a retry, on the replica that did not see the call: replayed, nothing applied again
        retry = a.Normalize(sync_request(sid, y, 1, 1), timeout=10)
        assert retry.replayed and retry.version == 2 and retry.mean == second.mean
        assert tensor_from_proto(retry.output, "o").equal(tensor_from_proto(second.output, "o"))
        assert client.get_session(sid).version == 2
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"sync.step: step 0 of session {sid!r} is stale: step 1 has completed, and only the "
            "last 8 completed steps are answered again",
        ):
            b.Normalize(sync_request(sid, x, 0, 0), timeout=10)


def test_a_participant_leaving_aborts_the_step_on_every_replica(
    pair: tuple[Server, Server], stubs: tuple[pb_grpc.NormalizerStub, ...]
) -> None:
    a, b = stubs
    with Client(pair[0].address, timeout=30) as client:
        sid = client.create_session(3, sync_participants=3, sync_timeout=60).session_id
        x = torch.randn(4, 3)
        waiting = a.Normalize.future(sync_request(sid, x, 0, 0), timeout=30)
        leaving = b.Normalize.future(sync_request(sid, x, 1, 0), timeout=30)
        leaving_aborts_the_step(client, sid, waiting, leaving)
        done = [
            (a, b, a)[r].Normalize.future(sync_request(sid, x, r, 0), timeout=30) for r in range(3)
        ]
        assert {f.result().version for f in done} == {2}


def test_sync_reduce_across_replicas(
    pair: tuple[Server, Server], stubs: tuple[pb_grpc.NormalizerStub, ...]
) -> None:
    with Client(pair[0].address, timeout=30) as ca, Client(pair[1].address, timeout=30) as cb:
        sid = ca.create_session(3, sync_participants=2).session_id
        parts = [(torch.randn(3), torch.randn(3), 4), (torch.randn(3), torch.randn(3), 6)]
        got: list = [None, None]

        def reduce(r: int) -> None:
            got[r] = (ca, cb)[r].sync_reduce(sid, (r, 0), *parts[r])

        threads = [threading.Thread(target=reduce, args=(r,)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        want = parts[0][0].double() + parts[1][0].double()
        for g in got:
            assert g.count == 10 and not g.replayed
            assert torch.equal(g.sum_dy, want.float())
        again = ca.sync_reduce(sid, (1, 0), *parts[1])
        assert again.replayed and torch.equal(again.sum_dy, got[1].sum_dy)


def test_redis_lost_mid_step_is_unavailable_and_the_step_applies_once(
    redis_server: RedisServer,
    pair: tuple[Server, Server],
    stubs: tuple[pb_grpc.NormalizerStub, ...],
) -> None:
    a, b = stubs
    with Client(pair[0].address, timeout=30) as client:
        sid = client.create_session(3, sync_participants=2, sync_timeout=60).session_id
    x, y = torch.randn(4, 3), torch.randn(5, 3)
    waiting = a.Normalize.future(sync_request(sid, x, 0, 0), timeout=30)
    time.sleep(0.3)  # rank 0's contribution is in Redis
    redis_server.kill()
    with pytest.raises(grpc.RpcError) as err:
        waiting.result()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details().startswith(
        f"the synchronized sessions' rendezvous, Redis at {redis_server.url}, is unreachable "
        f"during forward step 0 of session {sid!r} ("
    ), err.value.details()
    assert err.value.details().endswith(
        "); nothing was half-applied (a step is applied once): send the step again"
    )
    redis_server.restart()
    # rank 0 sends its step again (rejoining its contribution, kept by Redis), rank 1 arrives
    again = a.Normalize.future(sync_request(sid, x, 0, 0), timeout=30)
    second = b.Normalize(sync_request(sid, y, 1, 0), timeout=30)
    first = again.result()
    assert first.version == second.version == 2 and first.mean == second.mean
    ref = torch.nn.functional.batch_norm(torch.cat([x, y]), None, None, training=True)
    out = torch.cat([tensor_from_proto(r.output, "o") for r in (first, second)])
    assert (out - ref).abs().max() < 1e-5
    with Client(pair[1].address, timeout=30) as client:
        assert client.get_session(sid).num_batches_tracked == 1


def test_a_combine_error_reaches_every_replica(
    pair: tuple[Server, Server], stubs: tuple[pb_grpc.NormalizerStub, ...]
) -> None:
    """One value per channel over the whole group: the combine refuses it, and the participant
    on the other replica gets the same INVALID_ARGUMENT; nothing applied, the step may be sent
    again."""
    a, b = stubs
    with Client(pair[0].address, timeout=30) as client:
        sid = client.create_session(3, sync_participants=2).session_id
        one, empty = torch.randn(1, 3), torch.randn(0, 3)
        message = (
            "input.shape: batch statistics need more than 1 value per channel over the group, got 1"
        )
        with unchanged(client, sid):
            waiting = a.Normalize.future(sync_request(sid, one, 0, 0), timeout=30)
            for call in (
                lambda: b.Normalize(sync_request(sid, empty, 1, 0), timeout=30),
                waiting.result,
            ):
                with expect_status(grpc.StatusCode.INVALID_ARGUMENT, message):
                    call()
        x, y = torch.randn(2, 3), torch.randn(3, 3)
        first = a.Normalize.future(sync_request(sid, x, 0, 0), timeout=30)
        assert b.Normalize(sync_request(sid, y, 1, 0), timeout=30).version == 2
        assert first.result().version == 2


def test_a_stream_leaving_aborts_the_step_on_the_other_replica(
    pair: tuple[Server, Server], stubs: tuple[pb_grpc.NormalizerStub, ...]
) -> None:
    a, b = stubs
    with Client(pair[0].address, timeout=30) as client:
        sid = client.create_session(3, sync_participants=3, sync_timeout=60).session_id
        x = torch.randn(4, 3)
        waiting = a.Normalize.future(sync_request(sid, x, 0, 0), timeout=30)
        leaving = b.NormalizeStream(iter(sync_chunks(sid, x, 1, 0)), timeout=30)
        leaving_aborts_the_step(client, sid, waiting, leaving)


def test_a_dead_combiner_is_taken_over(
    redis_server: RedisServer,
    pair: tuple[Server, Server],
    stubs: tuple[pb_grpc.NormalizerStub, ...],
) -> None:
    """A replica that took the last arrival and died before combining leaves the step closed
    with its lease: once the lease runs out, a waiting participant combines it."""
    import redis

    from normserve.server import ops
    from normserve.server.service._sync_codec import pack_moments

    a, b = stubs
    with Client(pair[0].address, timeout=30) as client:
        sid = client.create_session(3, sync_participants=2, sync_timeout=30).session_id
    x, y = torch.randn(3, 3), torch.randn(4, 3) + 2
    waiting = a.Normalize.future(sync_request(sid, x, 0, 0), timeout=30)
    r = redis.Redis.from_url(redis_server.url)
    keys: list[bytes] = []
    deadline = time.monotonic() + 10
    while not keys and time.monotonic() < deadline:
        keys = [k for k in r.keys("normserve:g:*:f:*") if r.hexists(k, "p0")]
        time.sleep(0.05)
    assert len(keys) == 1
    # rank 1's arrival, as its replica's script wrote it just before the replica died
    r.hset(keys[0], mapping={"p1": pack_moments(ops.moments(y), [4]), "n": 2, "st": "c"})
    r.hset(keys[0], "lease", 0)
    first = waiting.result()
    assert first.version == 2 and not first.replayed
    ref = torch.nn.functional.batch_norm(torch.cat([x, y]), None, None, training=True)
    assert (tensor_from_proto(first.output, "o") - ref[:3]).abs().max() < 1e-5
    # rank 1 sends its step again (its replica never answered): the step's answer
    second = b.Normalize(sync_request(sid, y, 1, 0), timeout=30)
    assert second.replayed and second.version == 2 and second.mean == first.mean
    assert (tensor_from_proto(second.output, "o") - ref[3:]).abs().max() < 1e-5
    r.close()
