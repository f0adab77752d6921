"""A soak: 64 concurrent clients against one server process, mixing everything a client does.

Unary and streamed TRAIN and EVAL batches, reads, deliberate errors (each with its exact status)
and cancellations (a stream cancelled half-way through a TRAIN batch) for NORMSERVE_SOAK_SECONDS
(default 30). At the end: no unexpected status, the server alive and its resident memory flat
(the end within 20% of what it was after a warm-up), and every session's num_batches_tracked equal
to the TRAIN batches the clients saw acknowledged for it: a cancelled or refused batch applied
nothing, an acknowledged one was applied exactly once.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from normserve import wire
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from tests.security._process import ServerProcess

SECONDS = float(os.environ.get("NORMSERVE_SOAK_SECONDS", "30"))
SEED = int(os.environ.get("NORMSERVE_SOAK_SEED", "11"))
CLIENTS = 64
CHANNELS = 8
SESSIONS = 16
C = 32
MiB = 1 << 20
#: the server's per-stream bound here; a deliberate abuser passes it by one chunk
STREAM_BOUND = 4 * MiB
BIG_ROWS = MiB // (4 * C)  # 1 MiB chunks
PREFIX = "/normserve.v1.Normalizer/"
TIMEOUT = 60.0
OK = grpc.StatusCode.OK


@dataclass
class Tally:
    acknowledged: Counter[str] = field(default_factory=Counter)  # TRAIN batches per session
    actions: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)

    def expect(
        self, action: str, got: grpc.StatusCode, want: set[grpc.StatusCode], details: str
    ) -> None:
        self.actions[action] += 1
        self.codes[got.name] += 1
        if got not in want:
            self.unexpected.append(
                f"{action}: {got.name} ({details}), expected {sorted(w.name for w in want)}"
            )


def _x(rng: random.Random, rows: int, c: int = C) -> torch.Tensor:
    return torch.randn(rows, c, generator=torch.Generator().manual_seed(rng.randrange(2**31)))


class Client:
    """One of the 64: its own random choices, a shared channel."""

    def __init__(
        self, channel: grpc.aio.Channel, sessions: list[str], tally: Tally, seed: int
    ) -> None:
        self.rng = random.Random(seed)
        self.sessions = sessions
        self.tally = tally
        self.stub = pb_grpc.NormalizerStub(channel)
        self.normalize = channel.unary_unary(PREFIX + "Normalize")
        self.stream = channel.stream_stream(PREFIX + "NormalizeStream")

    async def run(self, deadline: float) -> None:
        actions = [
            (self.unary, 30),
            (self.streamed, 20),
            (self.reads, 15),
            (self.errors, 15),
            (self.cancelled_stream, 10),
            (self.over_bound, 2),
            (self.cancelled_eval, 8),
        ]
        fns, weights = zip(*actions, strict=True)
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            await self.rng.choices(fns, weights)[0]()

    async def _unary(self, action: str, raw: bytes, want: set[grpc.StatusCode]) -> bytes | None:
        try:
            answer = await self.normalize(raw, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as err:
            self.tally.expect(action, err.code(), want, err.details() or "")
            return None
        self.tally.expect(action, OK, want, "")
        return answer

    async def unary(self) -> None:
        sid = self.rng.choice(self.sessions)
        train = self.rng.random() < 0.6
        x = _x(self.rng, self.rng.randint(2, 64))
        raw = wire.encode_normalize_request(sid, pb.MODE_TRAIN if train else pb.MODE_EVAL, x, False)
        answer = await self._unary("unary " + ("train" if train else "eval"), raw, {OK})
        if answer is not None:
            out = wire.parse_normalize_response(answer).output
            assert out is not None and out.shape == x.shape
            if train:
                self.tally.acknowledged[sid] += 1

    async def streamed(self) -> None:
        """A stream of 1-4 complete batches, TRAIN or EVAL, each in 1-3 chunks."""
        sid = self.rng.choice(self.sessions)
        train = self.rng.random() < 0.6
        batches = [
            [_x(self.rng, self.rng.randint(2, 32)) for _ in range(self.rng.randint(1, 3))]
            for _ in range(self.rng.randint(1, 4))
        ]
        reqs = []
        for chunks in batches:
            for i, x in enumerate(chunks):
                mode = (pb.MODE_TRAIN if train else pb.MODE_EVAL) if i == 0 else 0
                reqs.append(
                    wire.encode_stream_request(
                        sid if i == 0 else "", mode, x, i == len(chunks) - 1, False
                    )
                )
        call = self.stream(iter(reqs), timeout=TIMEOUT)
        ended = 0
        try:
            async for raw in call:
                ended += wire.parse_stream_response(raw).end_of_batch
        except grpc.aio.AioRpcError as err:
            self.tally.expect("stream", err.code(), {OK}, err.details() or "")
        else:
            self.tally.expect("stream", OK, {OK}, "")
        if train:
            self.tally.acknowledged[sid] += ended

    async def reads(self) -> None:
        sid = self.rng.choice(self.sessions)
        which = self.rng.randrange(3)
        try:
            if which == 0:
                await self.stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=TIMEOUT)
            elif which == 1:
                await self.stub.ExportState(pb.ExportStateRequest(session_id=sid), timeout=TIMEOUT)
            else:
                await self.stub.ListSessions(pb.ListSessionsRequest(page_size=5), timeout=TIMEOUT)
        except grpc.aio.AioRpcError as err:
            self.tally.expect("read", err.code(), {OK}, err.details() or "")
        else:
            self.tally.expect("read", OK, {OK}, "")

    async def errors(self) -> None:
        """A deliberate error, with the one status it must get; nothing of it is applied."""
        sid = self.rng.choice(self.sessions)
        which = self.rng.randrange(5)
        if which == 0:
            try:
                await self.stub.GetSession(
                    pb.GetSessionRequest(session_id=f"missing-{self.rng.randrange(1000)}"),
                    timeout=TIMEOUT,
                )
                got, details = OK, ""
            except grpc.aio.AioRpcError as err:
                got, details = err.code(), err.details() or ""
            self.tally.expect("error: missing session", got, {grpc.StatusCode.NOT_FOUND}, details)
        elif which == 1:
            raw = wire.encode_normalize_request(sid, pb.MODE_TRAIN, _x(self.rng, 4, C + 1), False)
            await self._unary("error: wrong width", raw, {grpc.StatusCode.INVALID_ARGUMENT})
        elif which == 2:
            raw = wire.encode_normalize_request(sid, 7, _x(self.rng, 4), False)
            await self._unary("error: unknown mode", raw, {grpc.StatusCode.INVALID_ARGUMENT})
        elif which == 3:
            cfg = pb.SessionConfig(num_features=4, eps=float("nan"))
            try:
                await self.stub.CreateSession(pb.CreateSessionRequest(config=cfg), timeout=TIMEOUT)
                got, details = OK, ""
            except grpc.aio.AioRpcError as err:
                got, details = err.code(), err.details() or ""
            self.tally.expect("error: bad config", got, {grpc.StatusCode.INVALID_ARGUMENT}, details)
        else:  # chunks of one batch that disagree in shape: the second ends the stream
            first = wire.encode_stream_request(sid, pb.MODE_TRAIN, _x(self.rng, 4), False, False)
            second = wire.encode_stream_request("", 0, torch.randn(4, C, 2), True, False)
            await self._stream_error(
                "error: chunk shapes", [first, second], grpc.StatusCode.INVALID_ARGUMENT
            )

    async def _stream_error(self, action: str, reqs: list[bytes], want: grpc.StatusCode) -> None:
        """Writes ``reqs`` (the last one triggers the error), then reads the status. Nothing is
        written after it: grpc's asyncio client, writing to a call the server has ended, reports
        its own INTERNAL instead of the server's status."""
        call = self.stream(timeout=TIMEOUT)
        try:
            for raw in reqs:
                await call.write(raw)
            async for _ in call:
                pass
            got, details = OK, ""
        except grpc.aio.AioRpcError as err:
            got, details = err.code(), err.details() or ""
        self.tally.expect(action, got, {want}, details)

    async def over_bound(self) -> None:
        """One stream holds its bound of a TRAIN batch, then one chunk more."""
        sid = self.rng.choice(self.sessions)
        x = _x(self.rng, BIG_ROWS)
        reqs = [
            wire.encode_stream_request(
                sid if i == 0 else "", pb.MODE_TRAIN if i == 0 else 0, x, False, False
            )
            for i in range(STREAM_BOUND // MiB + 1)
        ]
        await self._stream_error("error: stream bound", reqs, grpc.StatusCode.RESOURCE_EXHAUSTED)

    async def cancelled_stream(self) -> None:
        """A stream completes one TRAIN batch (acknowledged), sends half of the next, and is
        cancelled: the half batch must not be applied."""
        sid = self.rng.choice(self.sessions)
        call = self.stream(timeout=TIMEOUT)
        try:
            await call.write(
                wire.encode_stream_request(sid, pb.MODE_TRAIN, _x(self.rng, 8), True, False)
            )
            answer = wire.parse_stream_response(await call.read())
            assert answer.end_of_batch
            self.tally.acknowledged[sid] += 1
            await call.write(
                wire.encode_stream_request(sid, pb.MODE_TRAIN, _x(self.rng, 8), False, False)
            )
            await asyncio.sleep(self.rng.random() * 0.01)
        except grpc.aio.AioRpcError as err:
            self.tally.expect(
                "cancel: stream", err.code(), {grpc.StatusCode.CANCELLED}, err.details() or ""
            )
            return
        call.cancel()
        self.tally.expect("cancel: stream", await call.code(), {grpc.StatusCode.CANCELLED}, "")

    async def cancelled_eval(self) -> None:
        """A unary EVAL call cancelled in flight (it changes nothing, whether it ran or not)."""
        sid = self.rng.choice(self.sessions)
        raw = wire.encode_normalize_request(sid, pb.MODE_EVAL, _x(self.rng, 256), False)
        call = self.normalize(raw, timeout=TIMEOUT)
        await asyncio.sleep(self.rng.random() * 0.002)
        call.cancel()
        try:
            await call
            got = OK
        except asyncio.CancelledError:
            got = grpc.StatusCode.CANCELLED
        except grpc.aio.AioRpcError as err:
            got = err.code()
        self.tally.expect("cancel: unary eval", got, {grpc.StatusCode.CANCELLED, OK}, "")


async def _soak(
    address: str, rss: list[tuple[float, int]], read_rss: object
) -> tuple[Tally, dict[str, int]]:
    tally = Tally()
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 64 * MiB)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(CHANNELS)]
    stub = pb_grpc.NormalizerStub(channels[0])
    try:
        sessions = []
        for i in range(SESSIONS):
            cfg = pb.SessionConfig(num_features=C, momentum=0.1 if i % 2 else None)
            created = await stub.CreateSession(pb.CreateSessionRequest(config=cfg), timeout=TIMEOUT)
            sessions.append(created.session.session_id)
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + SECONDS
        clients = [
            Client(channels[i % CHANNELS], sessions, tally, SEED * 1000 + i) for i in range(CLIENTS)
        ]
        tasks = [asyncio.ensure_future(c.run(deadline)) for c in clients]
        while not all(t.done() for t in tasks):
            rss.append((loop.time() - start, read_rss()))  # type: ignore[operator]
            await asyncio.wait(tasks, timeout=1.0)
        for t in tasks:
            t.result()  # a client's own failure (an assertion) fails the soak
        health = await health_pb2_grpc.HealthStub(channels[0]).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        tracked = {}
        for sid in sessions:
            got = await stub.GetSession(
                pb.GetSessionRequest(session_id=sid, omit_tensors=True), timeout=TIMEOUT
            )
            tracked[sid] = got.session.num_batches_tracked
        return tally, tracked
    finally:
        for ch in channels:
            await ch.close()


def test_64_clients_mixing_everything_leave_nothing_behind() -> None:
    flags = ("--max-stream-buffer-bytes", str(STREAM_BOUND), "--quota-rps", "0")
    with ServerProcess(*flags) as srv:
        rss: list[tuple[float, int]] = []
        t0 = time.monotonic()
        tally, tracked = asyncio.run(_soak(srv.address, rss, srv.rss))
        elapsed = time.monotonic() - t0
        time.sleep(1.0)
        end = srv.rss()
        assert srv.alive(), srv.tail()
    warm = [r for t, r in rss if t >= max(5.0, SECONDS * 0.2)]
    start = warm[0] if warm else rss[0][1]
    peak = max(r for _, r in rss)
    calls = sum(tally.actions.values())
    print(
        f"\nsoak: {CLIENTS} clients, {SECONDS:g} s ({elapsed:.0f} s with setup), {calls} calls "
        f"({calls / SECONDS:.0f}/s), {sum(tally.acknowledged.values())} TRAIN batches acknowledged"
    )
    print(f"  actions: {dict(tally.actions.most_common())}")
    print(f"  status codes: {dict(tally.codes.most_common())}")
    print(
        f"  server RSS: after warm-up {start / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB, end "
        f"{end / MiB:.0f} MiB ({(end - start) / start:+.1%})"
    )
    assert not tally.unexpected, "\n".join(tally.unexpected[:20])
    assert tracked == {sid: tally.acknowledged[sid] for sid in tracked}, (
        tracked,
        tally.acknowledged,
    )
    assert end <= 1.2 * start, (start, end)
