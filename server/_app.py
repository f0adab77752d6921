"""Assembles and runs the gRPC server: servicer, interceptors, health, reflection, shutdown."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import sys
import threading
from concurrent import futures
from types import FrameType

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from normserve.server._logging import configure_logging
from normserve.server._metrics import Metrics, MetricsHTTPServer
from normserve.server._settings import Settings
from normserve.server._transport._interceptors import ErrorInterceptor
from normserve.server._transport._observe import ObservabilityInterceptor, StageRecorder
from normserve.server._transport._servicer import NormalizerServicer, handlers
from normserve.server.service import ServiceError, SessionManager
from normserve.v1 import normserve_pb2 as pb

__all__ = ["Server", "serve", "start_server"]

log = logging.getLogger("normserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Normalizer"].full_name


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Linux's SO_REUSEPORT would let a second server bind a busy port silently.
        ("grpc.so_reuseport", 0),
    ]


def tune_malloc(mmap_threshold: int = 64 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keeps large allocations in glibc's heap instead of a fresh mmap each time (process-wide;
    a no-op without glibc). Returns whether it applied."""
    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        # mallopt parameters from malloc.h: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3
        return bool(libc.mallopt(-3, mmap_threshold)) and bool(libc.mallopt(-1, trim_threshold))
    except (OSError, AttributeError):
        return False


class Server:
    """A started normserve server in this process. ``port`` is the bound port (useful with :0);
    ``metrics`` holds its Prometheus collectors (on ``registry``, or a fresh one)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        if settings.malloc_tuning:
            tune_malloc()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)  # process-wide (checked: RPC threads too)
        self.sessions = SessionManager(settings.device, settings.max_sessions)
        self.metrics = Metrics(registry)
        self.metrics.track_sessions(lambda: len(self.sessions))
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            # outermost first: observability sees the status the error table chose
            interceptors=[ObservabilityInterceptor(self.metrics), ErrorInterceptor()],
            options=channel_options(settings.max_message_bytes),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        servicer = NormalizerServicer(self.sessions, StageRecorder(self.metrics))
        methods = handlers(servicer)
        self._grpc.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, methods),)
        )
        self._grpc.add_registered_method_handlers(SERVICE_NAME, methods)  # type: ignore[attr-defined]
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc
        )
        host = settings.address.rsplit(":", 1)[0]
        try:
            self.port = self._grpc.add_insecure_port(settings.address)
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(
                f"--address: cannot listen on {settings.address!r} (in use, or not a host:port "
                "of this machine)"
            )
        self.address = f"{host}:{self.port}"
        self._stopped = threading.Event()
        self.metrics_server: MetricsHTTPServer | None = None
        self.metrics_address = ""

    def start(self) -> Server:
        if self.settings.metrics_address not in ("", "off"):
            self.metrics_server = MetricsHTTPServer(
                self.settings.metrics_address, self.metrics.registry
            )
            self.metrics_address = self.metrics_server.address
        self._grpc.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, new calls are refused, calls in flight get ``grace`` seconds."""
        self.health.enter_graceful_shutdown()
        self._grpc.stop(self.settings.grace_seconds if grace is None else grace).wait()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def start_server(
    settings: Settings | None = None, registry: CollectorRegistry | None = None
) -> Server:
    """Builds and starts a server (returns at once); ``Server.stop`` ends it."""
    return Server(settings or Settings.from_env(), registry).start()


def serve(settings: Settings | None = None) -> int:
    """Runs a server until SIGTERM or SIGINT, then drains it; returns the process exit code."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    try:
        settings.validate()
        server = start_server(settings)
    except (OSError, ValueError, ServiceError) as err:
        log.error("normserve cannot start: %s", err)
        return 2
    log.info(
        "normserve listening on %s (device %s, %d workers; metrics on %s)",
        server.address,
        server.sessions.default_device,
        settings.workers,
        server.metrics_address or "turned off",
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: draining (grace %.1fs)", signal.Signals(signum).name, settings.grace_seconds)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop()
    log.info("stopped")
    return 0
