"""A raw bytes echo gRPC service with normserve's server settings: the transport limit to compare with.

Two more methods are floors rather than limits: ``Kernel`` (view the batch, one torch kernel, send
the output: the least a Python server must do per unary batch) and ``StoreForward`` (hold each
streamed batch until its last chunk, then echo it: what whole-batch statistics impose on a stream).

``python benchmarks/echo.py [--address 127.0.0.1:0]`` serves ``/bench.Echo/Unary`` (returns the
request bytes) and ``/bench.Echo/Stream`` (returns every message as it arrives) and prints
``listening on HOST:PORT`` to stdout once it is bound; SIGTERM or SIGINT stops it.

No protobuf is parsed on either side (identity serializers), so what it measures is gRPC itself on
this machine: the same thread pool size, message size limits, socket options and concurrency limit
as a normserve server built from ``Settings()`` defaults.

Only public APIs: ``normserve.server`` (``Settings``, its ``channel_options`` and the process
settings of ``configure_process``) and ``normserve.wire``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any

import grpc
import torch

from normserve import wire
from normserve.server import Settings, channel_options, configure_process

SERVICE = "bench.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
KERNEL = f"/{SERVICE}/Kernel"
STORE = f"/{SERVICE}/StoreForward"


def _unary(request: bytes, context: Any) -> bytes:
    return request


def _stream(requests: Iterable[bytes], context: Any) -> Iterator[bytes]:
    yield from requests


def _kernel(request: bytes, context: Any) -> bytes:
    """A floor for a unary TRAIN call: the least any Python server must do with a batch. View the
    tensor in a NormalizeRequest (zero-copy), run ONE fused torch batch-norm kernel, and send a
    NormalizeResponse back (one copy): the output and two [C] statistics, the kernel's inverse
    std standing in for the variance (same size, no second kernel). No sessions, no running
    statistics, no checks, no metrics."""
    x = wire.parse_normalize_request(request).tensor()
    out, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    return wire.encode_normalize_response(out, mean, invstd, 0, True)


def _store_forward(requests: Iterable[bytes], context: Any) -> Iterator[bytes]:
    """A floor for a streamed TRAIN batch: no output can leave before the last chunk has arrived
    (the statistics cover the whole batch), so hold each batch's messages until its end_of_batch,
    then send them all back. No parsing of the tensors, no computing."""
    held: list[bytes] = []
    for raw in requests:
        held.append(raw)
        if wire.parse_stream_request(raw).end_of_batch:
            yield from held
            held = []


def build_server(address: str, settings: Settings | None = None) -> tuple[grpc.Server, str]:
    """An unstarted echo server bound to ``address``; returns it and the bound host:port."""
    settings = settings or Settings()
    configure_process(settings)  # the same process settings as a normserve server
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
        options=channel_options(settings),
        maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
    )
    # None serializers: the handlers see and return the raw message bytes.
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        "Kernel": grpc.unary_unary_rpc_method_handler(_kernel),
        "StoreForward": grpc.stream_stream_rpc_method_handler(_store_forward),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, f"{address.rsplit(':', 1)[0]}:{port}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--address", default="127.0.0.1:0", help="host:port to bind (port 0: any)")
    args = p.parse_args(argv)
    server, address = build_server(args.address)
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"listening on {address}", flush=True)
    stop.wait()
    server.stop(0).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
