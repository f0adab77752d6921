"""``normserve bench``: the command (flags, the run, ``bench compare``) over ``_bench``'s load
generator and ``_bench_report``'s results."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any

import grpc

from normserve.client._bench import EarlyFailure, check_target, normserve_calls, run_load
from normserve.client._bench_report import (
    Result,
    compare_table,
    format_summary,
    load_result,
    machine_info,
)
from normserve.client._cli import (
    add_connection_arguments,
    connection_kwargs,
    positive_seconds,
    target_address,
)
from normserve.client._common import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_TARGET,
)
from normserve.client._errors import NormserveError, connect_hint

__all__ = ["add_parser", "parse_shape"]


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be integers like 64,256: {text!r}") from None
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(
            f"shape needs at least 2 positive dims [N, C, ...]: {text!r}"
        )
    return shape


def _metadata(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"metadata must be key=value: {text!r}")
    return key.strip().lower(), value


def _config(
    args: argparse.Namespace, concurrency: int, nbytes: int, security: dict[str, Any]
) -> dict[str, Any]:
    return {
        "target": args.target,
        "rpc": args.rpc,
        "shape": list(args.shape),
        "dtype": args.dtype,
        "mode": args.mode,
        "session": args.session or None,
        "concurrency": concurrency,
        "rate": args.rate,
        "duration_s": args.duration,
        "requests": args.requests,
        "warmup_s": args.warmup,
        "timeout_s": args.timeout,
        "chunk_bytes": args.chunk_bytes,
        "metadata_keys": sorted({k for k, _ in args.metadata}),
        "tls": bool(security["tls"] or security["ca_file"] or security["cert_file"]),
        "client_certificate": bool(security["cert_file"]),
        "token": security["token"] is not None,  # whether one was sent; never the token
        "request_bytes": nbytes,
    }


async def _bench(args: argparse.Namespace) -> Result:
    import torch

    from normserve.client._aio import AsyncClient

    x = torch.randn(args.shape).to(getattr(torch, args.dtype))  # built once, never timed
    nbytes = x.numel() * x.element_size()
    if args.rpc == "unary" and nbytes > DEFAULT_MAX_MESSAGE_BYTES - 4096:
        raise ValueError(
            f"a {nbytes}-byte batch does not fit one message; use --rpc stream (chunked)"
        )
    concurrency = args.concurrency or (16 if args.rate else 1)
    metadata = tuple(args.metadata) or None
    security = connection_kwargs(args)
    config = _config(args, concurrency, nbytes, security)
    async with AsyncClient(
        args.target, timeout=args.timeout, chunk_bytes=args.chunk_bytes, retry=0, **security
    ) as client:
        session_id = args.session
        if not session_id:
            info = await client.create_session(args.shape[1], metadata=metadata)
            session_id = info.session_id
        try:
            factory = normserve_calls(
                client, session_id, x, rpc=args.rpc, mode=args.mode, metadata=metadata,
                timeout=args.timeout,
            )  # fmt: skip
            progress = _progress_line() if sys.stderr.isatty() and not args.quiet else None
            result = await run_load(
                factory,
                concurrency=concurrency,
                rate=args.rate,
                duration=args.duration,
                requests=args.requests,
                warmup=args.warmup,
                drain=args.timeout + 1.0,
                bytes_per_request=nbytes,
                progress=progress,
                config=config,
            )
            if progress is not None:
                sys.stderr.write("\r\033[K")
        finally:
            if not args.session:
                with contextlib.suppress(NormserveError):
                    await client.delete_session(session_id, metadata=metadata)
    result.machine = machine_info()
    return result


def _progress_line() -> Callable[[str], None]:
    def write(text: str) -> None:
        sys.stderr.write("\r\033[K" + text)
        sys.stderr.flush()

    return write


def _run(args: argparse.Namespace) -> int:
    check_target(args.target, args.allow_remote)
    if args.plot:
        from normserve.client._bench_plot import require_matplotlib

        require_matplotlib()  # fail before the run, not after it
    try:
        result = asyncio.run(_bench(args))
    except KeyboardInterrupt:
        print("\nnormserve: bench interrupted; nothing measured is reported", file=sys.stderr)
        return 130
    except EarlyFailure as err:
        code = getattr(grpc.StatusCode, err.code, None)
        err.hint = connect_hint(code, err.message, args.target) if code else ""
        raise
    human = sys.stderr if args.json == "-" else sys.stdout
    print(format_summary(result), file=human, flush=True)
    if args.json:
        result.write_json(args.json)
    if args.plot:
        from normserve.client._bench_plot import plot_result

        plot_result(result, args.plot)
        print(f"wrote {args.plot}", file=human)
    return 0 if result.count and not result.error_count else 1


def _compare(args: argparse.Namespace) -> int:
    a, b = load_result(args.a), load_result(args.b)
    print(compare_table(a, b, (os.path.basename(args.a), os.path.basename(args.b))))
    return 0


USAGE = """normserve bench [--target HOST:PORT] [--rpc unary|stream] [--shape 64,256]
                       [--dtype float32|float16|bfloat16|float64] [--mode train|eval]
                       [--session ID] [--concurrency N | --rate R] [--duration S] [--requests N]
                       [--warmup S] [--timeout S] [--metadata K=V]... [--tls] [--ca-file PEM]
                       [--cert-file PEM --key-file PEM] [--token-file FILE]
                       [--allow-remote] [--json FILE|-] [--plot FILE.png] [--quiet]
       normserve bench compare A.json B.json"""


def add_parser(sub: Any) -> None:
    """Adds ``bench`` (and ``bench compare``) to the ``normserve`` command's subparsers."""
    p = sub.add_parser(
        "bench",
        help="load and latency test a server",
        usage=USAGE,
        description="Closed-loop (--concurrency) or open-loop (--rate) load on Normalize or "
        "NormalizeStream; latencies in an HDR histogram. Exit status 1 if any request failed.",
    )
    p.add_argument(
        "--target",
        type=target_address,
        default=os.environ.get("NORMSERVE_TARGET", DEFAULT_TARGET),
        help=f"server host:port (env NORMSERVE_TARGET; default {DEFAULT_TARGET})",
    )
    p.add_argument(
        "--allow-remote", action="store_true", help="allow a target that is not loopback"
    )
    add_connection_arguments(p)
    p.add_argument(
        "--metadata",
        type=_metadata,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="gRPC metadata sent with every call (repeatable)",
    )
    p.add_argument("--rpc", choices=("unary", "stream"), default="unary")
    p.add_argument("--shape", type=parse_shape, default=(64, 256), help="batch shape (64,256)")
    p.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16", "float64"), default="float32"
    )
    p.add_argument("--mode", choices=("train", "eval"), default="train")
    p.add_argument("--session", default="", help="existing session (default: a fresh one)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="callers (closed loop, default 1); with --rate, most requests in flight (16)",
    )
    p.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds (10)")
    p.add_argument("--requests", type=int, help="stop after this many measured requests")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    p.add_argument(
        "--timeout", type=positive_seconds, default=10.0, help="seconds per request (10)"
    )
    p.add_argument(
        "--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="stream chunk size (1 MiB)"
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the result as JSON to FILE (alone, or '-': stdout, errors included)",
    )
    p.add_argument("--plot", metavar="PNG", help="draw percentiles and latency over time")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_run)
    bsub = p.add_subparsers(dest="bench_command", metavar="{compare}")
    cmp_ = bsub.add_parser("compare", help="two JSON results side by side, with b/a ratios")
    cmp_.add_argument("a", help="baseline result (JSON)")
    cmp_.add_argument("b", help="result to compare with it (JSON)")
    cmp_.set_defaults(func=_compare)
