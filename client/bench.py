"""The load generator of ``normserve bench`` as a library: closed- and open-loop load over any gRPC
call, latencies in HDR histograms, results as text, JSON and charts.

``run_load`` drives a ``CallFactory``: ``normserve_calls`` makes one for Normalize or
NormalizeStream on an ``AsyncClient``; ``unary_calls`` and ``stream_calls`` make one for any method
(``raw_unary`` / ``raw_stream`` give raw-bytes methods of other services over the same client's
channel, as the benchmark suite's echo baseline uses), so normserve and a baseline are measured by
the same code.

>>> import asyncio, torch
>>> from normserve.client import AsyncClient
>>> from normserve.client.bench import format_summary, normserve_calls, run_load
>>> async def measure(target: str) -> None:
...     async with AsyncClient(target) as client:
...         session = await client.create_session(256)
...         calls = normserve_calls(
...             client, session.session_id, torch.randn(64, 256), rpc="unary", mode="train"
...         )
...         print(format_summary(await run_load(calls, concurrency=4, duration=5)))
>>> asyncio.run(measure("127.0.0.1:50051"))
"""

from __future__ import annotations

from normserve.client._bench import (
    BadResponse,
    Call,
    CallFactory,
    EarlyFailure,
    check_target,
    encode_batch,
    is_loopback,
    normserve_calls,
    raw_stream,
    raw_unary,
    run_load,
    stream_calls,
    unary_calls,
)
from normserve.client._bench_plot import plot_result
from normserve.client._bench_report import (
    PERCENTILES,
    Result,
    compare_table,
    fmt_us,
    format_summary,
    git_commit,
    load_result,
    machine_info,
    new_histogram,
)

__all__ = [
    "PERCENTILES",
    "BadResponse",
    "Call",
    "CallFactory",
    "EarlyFailure",
    "Result",
    "check_target",
    "compare_table",
    "encode_batch",
    "fmt_us",
    "format_summary",
    "git_commit",
    "is_loopback",
    "load_result",
    "machine_info",
    "new_histogram",
    "normserve_calls",
    "plot_result",
    "raw_stream",
    "raw_unary",
    "run_load",
    "stream_calls",
    "unary_calls",
]
