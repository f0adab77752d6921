"""No slow client starves the server: idle and parked streams hold no thread, idle ones time out.

A real server with its default settings holds 1,000 streams that send nothing and 64 parked in the
middle of a TRAIN batch, and still answers health checks, unary calls and GetSession; the parked
batches are never applied. Streams idle past ``stream_idle_timeout`` end with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve.client import Client
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_to_proto

from ._util import unchanged

CONNECTIONS = 16
IDLE_STREAMS = 1000
PARKED_STREAMS = 64
UNARY_CALLS = 50
#: Every wait below is bounded by this (seconds); none is a latency threshold.
BOUND = 20.0
NUM_FEATURES = 16


@pytest.fixture
def default_server() -> Iterator[Server]:
    """The server's default settings (16 workers, default limits), on a free loopback port; but
    one tenant may hold every stream (its --quota-streams of 256 would refuse the rest)."""
    srv = start_server(
        Settings(address="127.0.0.1:0", metrics_address="off", device="cpu", quota_streams=0)
    )
    yield srv
    srv.stop(0)


def _open_streams(server: Server) -> float:
    return server.metrics.registry.get_sample_value("normserve_open_streams") or 0.0


async def _until_open(server: Server, calls: list[grpc.aio.StreamStreamCall]) -> None:
    """Waits (at most BOUND seconds) until the server holds every call open; fails at once,
    naming the status, if the server ends any of them."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND
    while _open_streams(server) < len(calls):
        ended = [call for call in calls if call.done()]
        if ended:
            code, details = await ended[0].code(), await ended[0].details()
            raise AssertionError(
                f"the server ended {len(ended)} of {len(calls)} open streams, the first with "
                f"{code.name}: {details}"
            )
        assert loop.time() < deadline, f"{_open_streams(server):g} of {len(calls)} streams open"
        await asyncio.sleep(0.05)


def _chunk(
    session_id: str, x: torch.Tensor, *, first: bool, end: bool
) -> pb.NormalizeStreamRequest:
    return pb.NormalizeStreamRequest(
        session_id=session_id if first else "",
        mode=pb.MODE_TRAIN if first else pb.MODE_UNSPECIFIED,
        chunk=tensor_to_proto(x),
        end_of_batch=end,
    )


async def _idle(release: asyncio.Event) -> AsyncIterator[pb.NormalizeStreamRequest]:
    await release.wait()
    return
    yield  # an async generator that sends nothing


async def _parked(
    session_id: str, x: torch.Tensor, release: asyncio.Event
) -> AsyncIterator[pb.NormalizeStreamRequest]:
    yield _chunk(session_id, x, first=True, end=False)
    await release.wait()


def _unary_calls(address: str, session_id: str) -> list[int]:
    versions = []
    with Client(address) as client:
        for i in range(UNARY_CALLS):
            x = torch.randn(8, NUM_FEATURES, generator=torch.Generator().manual_seed(i))
            versions.append(client.normalize(session_id, x, timeout=5).version)
    return versions


async def _under_load(server: Server, parked_id: str, unary_id: str) -> None:
    release = asyncio.Event()
    # Many streams over many connections, as many clients would (a local subchannel pool: else
    # channels to one target share one connection).
    channels = [
        grpc.aio.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CONNECTIONS)
    ]
    stubs = [pb_grpc.NormalizerStub(ch) for ch in channels]
    x = torch.randn(4, NUM_FEATURES, generator=torch.Generator().manual_seed(99))
    calls: list[grpc.aio.StreamStreamCall] = []
    try:
        # opened a hundred at a time, as clients arrive: a burst of 1,000 new streams from one
        # asyncio client sometimes has the client's own core end a few of them
        for start in range(0, IDLE_STREAMS, 100):
            calls += [
                stubs[i % CONNECTIONS].NormalizeStream(_idle(release))
                for i in range(start, min(start + 100, IDLE_STREAMS))
            ]
            await _until_open(server, calls)
        calls += [
            stubs[i % CONNECTIONS].NormalizeStream(_parked(parked_id, x, release))
            for i in range(PARKED_STREAMS)
        ]
        await _until_open(server, calls)

        health = health_pb2_grpc.HealthStub(channels[0])
        answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING

        versions = await asyncio.to_thread(_unary_calls, server.address, unary_id)
        assert versions == list(range(versions[0], versions[0] + UNARY_CALLS))

        got = await stubs[1].GetSession(pb.GetSessionRequest(session_id=parked_id), timeout=5)
        assert got.session.session_id == parked_id
        # every stream is still open: none was refused or ended while the calls above ran
        assert _open_streams(server) == len(calls)
        assert not any(call.done() for call in calls)
    finally:
        release.set()
        results = await asyncio.wait_for(
            asyncio.gather(*(_drain(call) for call in calls), return_exceptions=True), BOUND
        )
        for ch in channels:
            await ch.close()
    # Idle streams ended cleanly; parked ones ended mid-batch, which the server refuses.
    assert results[:IDLE_STREAMS] == [grpc.StatusCode.OK] * IDLE_STREAMS
    assert results[IDLE_STREAMS:] == [grpc.StatusCode.INVALID_ARGUMENT] * PARKED_STREAMS


async def _drain(call: grpc.aio.StreamStreamCall) -> grpc.StatusCode:
    """Reads what is left of a call and returns its status code."""
    try:
        async for _ in call:
            raise AssertionError("a stream that completed no batch was answered")
    except grpc.aio.AioRpcError:
        pass  # the status is returned below
    return await call.code()


def test_idle_and_parked_streams_starve_nothing(default_server: Server) -> None:
    with Client(default_server.address, timeout=10) as client:
        parked_id = client.create_session(NUM_FEATURES).session_id
        unary_id = client.create_session(NUM_FEATURES).session_id
        before = client.get_session(unary_id)
        with unchanged(client, parked_id):
            asyncio.run(_under_load(default_server, parked_id, unary_id))
        after = client.get_session(unary_id)
        assert client.health(timeout=5) == "SERVING"
    assert after.version == before.version + UNARY_CALLS
    assert after.num_batches_tracked == before.num_batches_tracked + UNARY_CALLS
    assert _open_streams(default_server) == 0


# ---- the idle timeout


@pytest.fixture
def impatient_server() -> Iterator[Server]:
    srv = start_server(
        Settings(
            address="127.0.0.1:0", metrics_address="off", device="cpu", stream_idle_timeout=0.5
        )
    )
    yield srv
    srv.stop(0)


IDLE_MESSAGE = "the stream sent nothing for 0.5 s (the server's --stream-idle-timeout)"


async def _stream_then_wait(
    address: str, requests: list[pb.NormalizeStreamRequest]
) -> tuple[grpc.StatusCode, str, list[pb.NormalizeStreamResponse]]:
    """Sends ``requests``, then nothing (at most BOUND seconds); returns how the stream ended."""
    release = asyncio.Event()

    async def gen() -> AsyncIterator[pb.NormalizeStreamRequest]:
        for r in requests:
            yield r
        await release.wait()

    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.NormalizerStub(channel).NormalizeStream(gen(), timeout=BOUND)
        answers = []
        try:
            async for msg in call:
                answers.append(msg)
        except grpc.aio.AioRpcError:
            pass  # the status is read below
        code, details = await call.code(), await call.details()
        release.set()
    return code, details, answers


def test_stream_idle_mid_batch_is_ended_and_its_batch_discarded(impatient_server: Server) -> None:
    x = torch.randn(4, NUM_FEATURES, generator=torch.Generator().manual_seed(1))
    with Client(impatient_server.address, timeout=10) as client:
        sid = client.create_session(NUM_FEATURES).session_id
        with unchanged(client, sid):
            code, details, answers = asyncio.run(
                _stream_then_wait(impatient_server.address, [_chunk(sid, x, first=True, end=False)])
            )
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details == (IDLE_MESSAGE + "; batch 0 was not complete and nothing of it was applied")
    assert answers == []


def test_stream_idle_between_batches_is_ended_after_its_batch(impatient_server: Server) -> None:
    x = torch.randn(6, NUM_FEATURES, generator=torch.Generator().manual_seed(2))
    with Client(impatient_server.address, timeout=10) as client:
        sid = client.create_session(NUM_FEATURES).session_id
        before = client.get_session(sid)
        code, details, answers = asyncio.run(
            _stream_then_wait(
                impatient_server.address,
                [
                    _chunk(sid, x[:3], first=True, end=False),
                    _chunk(sid, x[3:], first=False, end=True),
                ],
            )
        )
        after = client.get_session(sid)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert details == IDLE_MESSAGE
    # the completed batch was answered and applied exactly once
    assert answers and {a.batch_index for a in answers} == {0}
    assert [a.end_of_batch for a in answers] == [False] * (len(answers) - 1) + [True]
    assert answers[0].version == before.version + 1
    assert after.version == before.version + 1
    assert after.num_batches_tracked == before.num_batches_tracked + 1
    bn = torch.nn.BatchNorm1d(NUM_FEATURES)  # the session default: momentum 0.1
    bn(x)
    torch.testing.assert_close(after.running_mean, bn.running_mean)
    torch.testing.assert_close(after.running_var, bn.running_var)
