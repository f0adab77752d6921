"""The load generator behind ``normserve bench``: closed and open loops over any gRPC call.

``run_load`` drives any ``CallFactory`` (each caller enters it once and gets an awaitable that makes
one request), so the benchmark suite measures normserve and a raw echo service with the same code.

The engine is asyncio: one thread, one channel, each caller an asyncio task. Measured on a 2-core
machine (client and server sharing it) against ``benchmarks/echo.py`` (64 KiB messages), asyncio
drove 20-40% more requests/s than the blocking client with one thread per caller at concurrency 4
and 64, at less client CPU per request; threads were ahead only at concurrency 1 (~250 vs ~350 us of client CPU per call), an
overhead normserve and the echo baseline pay alike. One thread also keeps the open-loop schedule
exact without locks, and a hard stop is a task cancel.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]

from normserve.client._bench_report import (
    HIGHEST_US,
    Result,
    fmt_us,
    new_histogram,
)
from normserve.client._common import (
    DEFAULT_CHUNK_BYTES,
)
from normserve.client._errors import NormserveError, from_rpc_error

__all__ = [
    "EARLY_FAILURES",
    "BadResponse",
    "Call",
    "CallFactory",
    "EarlyFailure",
    "check_target",
    "encode_batch",
    "is_loopback",
    "normserve_calls",
    "raw_stream",
    "raw_unary",
    "run_load",
    "stream_calls",
    "unary_calls",
]

#: One request: returns when the answer is complete, raises on failure.
Call = Callable[[], Awaitable[None]]
#: Entered once per caller (a stream stays open for that caller's whole run).
CallFactory = Callable[[], AbstractAsyncContextManager[Call]]

_PROGRESS_EVERY_S = 0.25
# asyncio's epoll waits are whole milliseconds, rounded up: an open-loop caller wakes this much
# early and sends at most this early, so a late wake-up never counts as server latency.
_EARLY_S = 0.001


class BadResponse(Exception):
    """The server answered OK but not with what the request asked for."""


#: The first this-many requests of a run failing the same way stop it (``run_load``'s default).
EARLY_FAILURES = 10


class EarlyFailure(Exception):
    """The run stopped early: its first requests all failed the same way, so the rest would too.
    ``code`` and ``message`` are what the server (or the call) said."""

    def __init__(self, count: int, code: str, message: str) -> None:
        super().__init__(
            f"bench stopped: its first {count} requests all failed with {code}: {message}"
        )
        self.count = count
        self.code = code
        self.message = message
        self.hint = ""


class _Recorder:
    """Latencies and errors of measured requests, overall and per second of the run."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.histogram = new_histogram()
        self.seconds: dict[int, Any] = {}
        self.errors: Counter[str] = Counter()
        self.messages: dict[str, str] = {}  # the first message seen for each error code
        self.second_errors: Counter[int] = Counter()
        self.last_done = start

    def ok(self, latency_s: float, done: float) -> None:
        us = min(HIGHEST_US, max(1, round(latency_s * 1e6)))
        self.histogram.record_value(us)
        sec = int(max(0.0, done - self.start))
        if sec not in self.seconds:
            self.seconds[sec] = new_histogram()
        self.seconds[sec].record_value(us)
        self.last_done = max(self.last_done, done)

    def error(self, name: str, done: float, message: str = "") -> None:
        self.errors[name] += 1
        self.messages.setdefault(name, message)
        self.second_errors[int(max(0.0, done - self.start))] += 1
        self.last_done = max(self.last_done, done)

    def series(self) -> list[dict[str, Any]]:
        last = max([*self.seconds, *self.second_errors], default=-1)
        out = []
        for sec in range(last + 1):
            point: dict[str, Any] = {"t": sec, "count": 0, "errors": self.second_errors.get(sec, 0)}
            point.update(p50_us=None, p99_us=None, max_us=None)
            h = self.seconds.get(sec)
            if h is not None:
                point.update(
                    count=int(h.get_total_count()),
                    p50_us=int(h.get_value_at_percentile(50)),
                    p99_us=int(h.get_value_at_percentile(99)),
                    max_us=int(h.get_max_value()),
                )
            out.append(point)
        return out


async def run_load(
    call_factory: CallFactory,
    *,
    concurrency: int = 1,
    rate: float | None = None,
    duration: float = 10.0,
    requests: int | None = None,
    warmup: float = 1.0,
    drain: float = 10.0,
    bytes_per_request: int = 0,
    progress: Callable[[str], None] | None = None,
    config: dict[str, Any] | None = None,
    stop_after_failures: int | None = EARLY_FAILURES,
) -> Result:
    """Runs ``concurrency`` callers for ``warmup`` + ``duration`` seconds (or until ``requests``
    measured requests were sent) and returns what was measured after the warm-up.

    Closed loop (``rate`` None): each caller sends its next request when the last one is answered.
    Open loop: request k is due at ``k / rate`` seconds; the next free caller takes it, and its
    latency counts from when it was due, so a stalled server's queue shows up in the latencies
    instead of silently lowering the rate (no coordinated omission). ``concurrency`` bounds the
    requests in flight. Requests still unanswered ``drain`` seconds after the end are cancelled
    and counted as UNFINISHED errors: every run stops by itself. An open-loop run sends nothing
    after its end: requests that were due but never sent (the server, or this client, fell behind)
    are counted as ``missed``, and the result holds the target and the achieved rate.

    When the first ``stop_after_failures`` requests (warm-up included) all fail with the same code
    and message, the run stops and raises ``EarlyFailure``: a wrong session, shape or target fails
    every request alike, and a run of them measures nothing.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be > 0 and warmup >= 0")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be >= 1, got {requests}")
    clock = time.perf_counter
    t0 = clock()
    window = t0 + warmup
    end = window + duration
    rec = _Recorder(window)
    issued = 0  # measured requests sent
    in_flight = 0  # measured requests not answered yet
    ticket = 0  # open loop: the next due request
    first_measured = math.ceil(warmup * rate - 1e-9) if rate else 0  # open loop: its first ticket
    first: list[tuple[str, str] | None] = []  # outcomes of the run's first requests
    failed_early: EarlyFailure | None = None

    def judge(outcome: tuple[str, str] | None) -> None:
        nonlocal failed_early
        if stop_after_failures is None or len(first) >= stop_after_failures:
            return
        first.append(outcome)
        if len(first) == stop_after_failures and outcome is not None and len(set(first)) == 1:
            failed_early = EarlyFailure(stop_after_failures, *outcome)

    async def caller() -> None:
        nonlocal issued, in_flight, ticket
        async with call_factory() as call:
            while failed_early is None:
                now = clock()
                if rate is None:
                    if now >= end:
                        return
                    due = now
                    measured = now >= window
                else:
                    # Offsets from the start, not absolute times: exact tickets at the boundaries.
                    offset = ticket / rate
                    if offset < warmup and now >= window:
                        # a warm-up that fell behind: its overdue requests are dropped, and the
                        # measured window starts on schedule
                        ticket = first_measured
                        continue
                    ticket += 1
                    if offset >= warmup + duration or now >= end:
                        return
                    due = t0 + offset
                    if due - now > _EARLY_S:
                        await asyncio.sleep(due - now - _EARLY_S)
                    measured = offset >= warmup
                if measured:
                    if requests is not None and issued >= requests:
                        return
                    issued += 1
                    in_flight += 1
                sent = clock()
                error = None
                message = ""
                try:
                    await call()
                except NormserveError as err:
                    error, message = err.code.name, err.message
                except Exception as err:
                    error, message = type(err).__name__, str(err)
                done = clock()
                judge(None if error is None else (error, message))
                if measured:
                    in_flight -= 1
                    if error is None:
                        rec.ok(done - min(due, sent), done)
                    else:
                        rec.error(error, done, message)

    def show() -> None:
        if progress is None:
            return
        now = clock()
        h = rec.histogram
        n = h.get_total_count()
        phase = "warm-up" if now < window else "measure"
        rps = n / (now - window) if now > window else 0.0
        lat = f"p50 {fmt_us(h.get_value_at_percentile(50))} p99 {fmt_us(h.get_value_at_percentile(99))}"
        progress(
            f"{phase} {now - t0:5.1f}/{warmup + duration:g}s  {n} ok  {rps:,.0f} req/s  "
            f"{lat + '  ' if n else ''}errors {sum(rec.errors.values())}"
        )

    tasks = [asyncio.ensure_future(caller()) for _ in range(concurrency)]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            left = end + drain - clock()
            if left <= 0 or failed_early is not None:
                break
            _, pending = await asyncio.wait(
                pending, timeout=min(left, _PROGRESS_EVERY_S), return_when=asyncio.ALL_COMPLETED
            )
            show()
    finally:
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    if in_flight:
        rec.errors["UNFINISHED"] += in_flight
    for res in results:
        if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
            raise res
    if failed_early is not None:
        raise failed_early
    missed = 0
    if rate is not None and requests is None:
        due_in_window = math.ceil((warmup + duration) * rate - 1e-9) - first_measured
        missed = max(0, due_in_window - issued)
    finished = max(rec.last_done, min(end, clock())) if rec.histogram.get_total_count() else clock()
    return Result(
        histogram=rec.histogram,
        elapsed_s=max(finished - window, 1e-9),
        errors=dict(rec.errors),
        error_messages=dict(rec.messages),
        bytes_per_request=bytes_per_request,
        series=rec.series(),
        config=dict(config or {}),
        target_rate=rate,
        sent=issued,
        missed=missed,
    )


# ---- calls: unary and streaming, over any gRPC method (normserve's or the echo service's)


def unary_calls(
    method: Any,
    request: Any,
    *,
    metadata: Sequence[tuple[str, str]] | None = None,
    timeout: float | None = None,
    check: Callable[[Any], None] | None = None,
) -> CallFactory:
    """Callers that send the same pre-built ``request`` to a grpc.aio unary-unary ``method``."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[Call]:
        async def call() -> None:
            try:
                response = await method(request, timeout=timeout, metadata=metadata)
            except grpc.RpcError as err:
                raise from_rpc_error(err) from None
            if check is not None:
                check(response)

        yield call

    return factory


class _StreamCaller:
    """One long-lived bidirectional stream; each call writes one batch's messages while reading
    the answers until ``batch_done`` says the batch is complete (writing and reading at once, so a
    server that answers message by message never fills the flow-control window)."""

    def __init__(
        self,
        open_stream: Callable[[], Any],
        requests: Sequence[Any],
        batch_done: Callable[[Any, int], bool],
        timeout: float | None,
    ) -> None:
        self._open = open_stream
        self._requests = requests
        self._batch_done = batch_done
        self._timeout = timeout
        self._call: Any = None

    async def __call__(self) -> None:
        if self._call is None:
            self._call = self._open()
        call = self._call
        writer = asyncio.ensure_future(self._write(call))
        try:
            await asyncio.wait_for(self._read(call), self._timeout)
            await writer
        except BaseException as err:
            writer.cancel()
            self.close()
            if isinstance(err, TimeoutError):
                raise NormserveError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self._timeout}s"
                ) from None
            if isinstance(err, grpc.RpcError):
                raise from_rpc_error(err) from None
            raise

    async def _write(self, call: Any) -> None:
        for request in self._requests:
            await call.write(request)

    async def _read(self, call: Any) -> None:
        index = 0
        while True:
            msg = await call.read()
            if msg is EOF:
                code = await call.code()
                raise NormserveError(
                    code if code != grpc.StatusCode.OK else grpc.StatusCode.UNKNOWN,
                    (await call.details()) or "the stream ended before the batch was answered",
                )
            if self._batch_done(msg, index):
                return
            index += 1

    def close(self) -> None:
        """Abandons the stream (after a failure: its state is unknown)."""
        if self._call is not None:
            self._call.cancel()
            self._call = None

    async def finish(self, wait: float = 5.0) -> None:
        """Ends the stream cleanly: half-closes it and waits for the server's OK, so a finished run
        counts as OK on the server, not CANCELLED. Cancels it only if the server does not finish
        within ``wait`` seconds."""
        call, self._call = self._call, None
        if call is None:
            return
        try:
            await asyncio.wait_for(self._drain(call), wait)
        except (TimeoutError, grpc.RpcError):
            call.cancel()

    @staticmethod
    async def _drain(call: Any) -> None:
        await call.done_writing()
        while await call.read() is not EOF:
            pass


def stream_calls(
    open_stream: Callable[[], Any],
    requests: Sequence[Any],
    *,
    batch_done: Callable[[Any, int], bool],
    timeout: float | None = None,
) -> CallFactory:
    """Callers that each keep one stream (``open_stream()``, a grpc.aio stream-stream call) and
    send ``requests`` (one batch, maybe several chunks) on it per call."""

    @asynccontextmanager
    async def factory() -> AsyncIterator[Call]:
        caller = _StreamCaller(open_stream, requests, batch_done, timeout)
        try:
            yield caller
        except BaseException:
            caller.close()
            raise
        await caller.finish()

    return factory


SERVICE = "/normserve.v1.Normalizer/"


def raw_unary(client: Any, method: str) -> Any:
    """A grpc.aio unary-unary callable for ``method`` (``"/package.Service/Method"``) over an
    ``AsyncClient``'s channel, with its options and credentials, taking and returning raw bytes
    (no protobuf either way): for ``unary_calls`` to any service on the same server."""
    return client._channel.unary_unary(method)


def raw_stream(client: Any, method: str) -> Any:
    """A grpc.aio stream-stream callable of raw bytes for ``method`` over an ``AsyncClient``'s
    channel: call it to open a stream, for ``stream_calls``."""
    return client._channel.stream_stream(method)


def encode_batch(
    session_id: str, x: Any, mode: str, *, rpc: str, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> list[bytes]:
    """One batch as the encoded messages normserve is sent, by the client's own encoders: one
    NormalizeRequest (unary), or NormalizeStreamRequest chunks of at most ``chunk_bytes`` along
    dim 0 (stream). Built once per run."""
    from normserve.client._common import mode_value
    from normserve.client._tensors import StreamPlan, normalize_request

    mode_value(mode)  # names a wrong mode before anything is sent
    if rpc == "unary":
        return [normalize_request(session_id, x, mode, False)]
    if rpc != "stream":
        raise ValueError(f"rpc must be 'unary' or 'stream', got {rpc!r}")
    return list(StreamPlan(session_id, mode, False, chunk_bytes).batch_requests(x))


def normserve_calls(
    client: Any,
    session_id: str,
    x: Any,
    *,
    rpc: str,
    mode: str,
    metadata: Sequence[tuple[str, str]] | None = None,
    timeout: float | None = None,
) -> CallFactory:
    """Normalize (``rpc='unary'``) or NormalizeStream calls of one batch ``x`` over an
    ``AsyncClient``'s channel, as raw bytes: the request is encoded once, and the answer is checked
    (its size; a stream's end_of_batch) but not decoded into tensors. The tool measures the server,
    and normserve costs the client what the raw echo baseline costs it."""
    from normserve.wire import parse_stream_response

    wire = encode_batch(session_id, x, mode, rpc=rpc, chunk_bytes=client.chunk_bytes)
    nbytes = x.numel() * x.element_size()
    if rpc == "unary":

        def check(response: bytes) -> None:
            if len(response) < nbytes:  # the output tensor alone is that long
                raise BadResponse(f"a {len(response)}-byte answer to a {nbytes}-byte batch")

        return unary_calls(
            raw_unary(client, SERVICE + "Normalize"),
            wire[0],
            metadata=metadata,
            timeout=timeout,
            check=check,
        )
    stream = raw_stream(client, SERVICE + "NormalizeStream")

    def batch_done(raw: bytes, _: int) -> bool:
        return parse_stream_response(raw).end_of_batch  # views the chunk, copies nothing

    return stream_calls(
        lambda: stream(metadata=metadata), wire, batch_done=batch_done, timeout=timeout
    )


# ---- safety: load only what is on this machine unless told otherwise


def _host(target: str) -> str | None:
    """The host of a gRPC target, or None for a Unix socket."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return None
    for scheme in ("dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme) :].lstrip("/")
            if "/" in t:  # dns://authority/host:port
                t = t.rsplit("/", 1)[1]
    if t.startswith("["):
        return t[1 : t.index("]")] if "]" in t else t[1:]
    if t.count(":") > 1:  # a bare IPv6 address
        return t
    return t.rsplit(":", 1)[0] if ":" in t else t


def is_loopback(target: str) -> bool:
    """Whether a gRPC target is on this machine: 127.0.0.0/8, ::1, localhost or a Unix socket."""
    host = _host(target)
    if host is None:
        return True
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_target(target: str, allow_remote: bool) -> None:
    """Refuses a non-loopback target unless ``allow_remote``: load tests are for your own servers."""
    if not allow_remote and not is_loopback(target):
        raise ValueError(
            f"refusing to load {target!r}: it is not a loopback address (127.0.0.0/8, ::1, "
            "localhost). Pass --allow-remote to load a server you are allowed to load."
        )
