"""Assembles and runs the gRPC server: servicer, interceptors, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from normserve.server._logging import configure_logging
from normserve.server._metrics import Metrics, MetricsHTTPServer
from normserve.server._processes import PROCESS_INDEX_ENV
from normserve.server._reflection import enable_reflection
from normserve.server._settings import Settings
from normserve.server._tls import check_protected_mode, server_credentials
from normserve.server._transport._auth import AuthInterceptor
from normserve.server._transport._interceptors import ErrorInterceptor
from normserve.server._transport._observe import ObservabilityInterceptor, StageRecorder
from normserve.server._transport._servicer import NormalizerServicer, handlers
from normserve.server.service import (
    KeyPolicy,
    NormalizerService,
    QuotaLimits,
    ServiceError,
    SessionManager,
    StoreUnavailable,
    StreamBuffers,
    TenantQuotas,
    open_store,
)
from normserve.v1 import normserve_pb2 as pb

__all__ = ["Server", "configure_process", "serve", "start_server"]

T = TypeVar("T")

log = logging.getLogger("normserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Normalizer"].full_name


def check_listen_address(address: str) -> None:
    """Raises ``OSError`` with a clear message when ``address`` is taken or not this machine's,
    before grpc tries it (grpc's core would first log its own raw error line to stderr). Port 0
    and names that do not resolve are left to grpc."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(
            host or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError):
        return
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # SO_REUSEADDR: a port whose old connections linger in TIME_WAIT is not "in use"
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise OSError(
                        f"--address: {address} is already in use (another normserve, or another "
                        "program, listens there): stop it or choose another port"
                    ) from None
                if err.errno == errno.EADDRNOTAVAIL:
                    raise OSError(
                        f"--address: {host} is not an address of this machine (use 127.0.0.1 "
                        "for this machine only, 0.0.0.0 for every interface)"
                    ) from None


def channel_options(settings: Settings, reuse_port: bool = False) -> list[tuple[str, int]]:
    ms = lambda seconds: int(seconds * 1000)  # noqa: E731
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Linux's SO_REUSEPORT would let a second server bind a busy port silently: only the
        # processes of one `--processes N` server share theirs
        ("grpc.so_reuseport", int(reuse_port)),
        # A peer that vanished (no FIN: a killed VM, a pulled cable) is found by keepalive pings
        # and its calls end, so its streams free what they hold.
        ("grpc.keepalive_time_ms", ms(settings.keepalive_seconds)),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients may ping as often as every 10 s without being told off (GOAWAY).
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_idle_ms", ms(settings.max_connection_idle_seconds)),
    ]
    if settings.max_connection_age_seconds:
        options += [
            ("grpc.max_connection_age_ms", ms(settings.max_connection_age_seconds)),
            ("grpc.max_connection_age_grace_ms", ms(settings.max_connection_age_seconds)),
        ]
    return options


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


class HeapTrimmer:
    """Returns the memory of large freed stream buffers to the operating system. glibc keeps freed
    heap memory for reuse up to its trim threshold (512 MiB under ``tune_malloc``), so a stream
    that held hundreds of MiB of a batch and was refused or cancelled would leave the process that
    much bigger. Called with the bytes each stream gives back; once ``threshold`` bytes have been
    given back in releases of at least ``min_release`` bytes each (smaller ones are ordinary
    traffic, whose memory the heap reuses), ``malloc_trim(0)`` runs ``delay`` seconds later and
    once more after ``3 * delay`` (coalescing a burst of streams ending, and leaving time for the
    buffers themselves to be freed)."""

    def __init__(
        self,
        threshold: int = 64 << 20,
        delay: float = 0.5,
        trim: Callable[[], object] | None = None,
        min_release: int = 16 << 20,
    ) -> None:
        self.threshold = threshold
        #: releases smaller than this are ordinary traffic, which the heap reuses: not counted
        self.min_release = min_release
        self.delay = delay
        self.trim = trim if trim is not None else _malloc_trim()
        self.trims = 0
        self._pending = 0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        if self.trim is None or nbytes < self.min_release:
            return
        with self._lock:
            self._pending += nbytes
            if self._pending < self.threshold or self._timer is not None:
                return
            self._timer = threading.Timer(self.delay, self._run)
            self._timer.daemon = True
            self._timer.start()

    def _run(self) -> None:
        with self._lock:
            self._pending, self._timer = 0, None
        assert self.trim is not None
        self.trim()
        self.trims += 1
        # once more a little later: a buffer the ending call still referenced is freed by then
        later = threading.Timer(3 * self.delay, self.trim)
        later.daemon = True
        later.start()


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, or None where there is none."""
    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


def configure_process(settings: Settings) -> None:
    """Process-wide settings, applied once by the process's entry point (``serve``), never by a
    server embedded in someone else's process: torch's thread count and glibc's malloc tuning."""
    if settings.malloc_tuning:
        tune_malloc()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)  # process-wide (checked: pool threads too)


class Server:
    """A started normserve server in this process. ``port`` is the bound port (useful with :0);
    ``metrics`` holds its Prometheus collectors (on ``registry``, or a fresh one).

    The gRPC server is grpc.aio on an event loop of its own thread; tensor work runs on the
    service's bounded pool. The methods here are plain blocking calls, so the server embeds in
    any program (tests, notebooks) whether or not it runs an event loop of its own.
    """

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``reuse_port``: share the port with sibling processes (``--processes``)."""
        self.settings = settings
        self.reuse_port = reuse_port
        # TLS files, tokens and protected mode first: a server that must not start starts nothing
        self._credentials, self.transport_security = server_credentials(settings)
        self.quotas = TenantQuotas(
            QuotaLimits(
                settings.quota_sessions,
                settings.quota_session_bytes,
                settings.quota_streams,
                settings.quota_inflight_bytes,
                settings.quota_rps,
            ),
            on_reject=lambda tenant, quota: self.metrics.record_quota_rejection(tenant, quota),
        )
        self._auth = AuthInterceptor.from_settings(settings, self.quotas)  # tokens, or ValueError
        self.unprotected = check_protected_mode(settings, tokens=self._auth.tokens is not None)
        self.store = open_store(
            settings.store,
            settings.state_dir,
            settings.durability,
            settings.snapshot_interval,
            KeyPolicy(settings.idempotency_keys, settings.idempotency_window),
        )
        try:
            self.sessions = SessionManager(
                settings.device,
                settings.max_sessions,
                settings.session_max_features(),
                store=self.store,
                quotas=self.quotas,
                default_ttl=settings.default_session_ttl(),
            )
        except BaseException:
            self.store.close()
            raise
        ping = getattr(self.store, "ping", None)
        if ping is not None:
            try:
                ping()
            except StoreUnavailable as err:
                # served anyway: Redis may start after normserve (a cluster coming up); calls that
                # need it answer UNAVAILABLE until it is back
                log.warning("%s; serving anyway: calls that need it fail until it answers", err)
            except ValueError:  # credentials or database no retry can fix: do not start
                self.store.close()
                raise
        recovery = getattr(self.store, "recovery", None)
        if recovery:
            log.info("state recovered from %s: %s", settings.state_dir, recovery)
        self.metrics = Metrics(registry)
        self.metrics.track_sessions(lambda: len(self.sessions))
        self.metrics.track_expired_sessions(lambda: self.sessions.expired)
        self.metrics.track_quotas(self.quotas.snapshot)
        self.service = NormalizerService(
            self.sessions,
            workers=settings.workers,
            max_answer_bytes=settings.max_message_bytes,
            stream_idle_timeout=settings.stream_idle_timeout,
            stages=StageRecorder(self.metrics),
            stream_buffers=StreamBuffers(
                settings.max_stream_buffer_bytes,
                settings.max_total_stream_buffer_bytes,
                on_release=HeapTrimmer() if settings.malloc_tuning else None,
            ),
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="normserve-grpc", daemon=True
        )
        self._thread.start()
        self._stopped = threading.Event()
        self._expiry = threading.Thread(target=self._expire_idle, name="normserve-ttl", daemon=True)
        self.metrics_server: MetricsHTTPServer | None = None
        self.metrics_address = ""
        try:
            self.port = self._run(self._build())
        except BaseException:
            self._close_loop()
            self.store.close()
            raise
        host = settings.address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _build(self) -> int:
        settings = self.settings
        self._grpc = grpc.aio.server(
            # outermost first: observability sees the status the error table chose, and the
            # error table the refusals of auth (which identifies the tenant, before decoding)
            interceptors=[ObservabilityInterceptor(self.metrics), ErrorInterceptor(), self._auth],
            options=channel_options(settings, self.reuse_port),
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs or None,
        )
        methods = handlers(NormalizerServicer(self.service))
        self._grpc.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, methods),)
        )
        self._grpc.add_registered_method_handlers(SERVICE_NAME, methods)  # type: ignore[attr-defined]
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), self._grpc)
        if not self.reuse_port:
            check_listen_address(settings.address)
        try:
            if self._credentials is None:
                port = self._grpc.add_insecure_port(settings.address)
            else:
                port = self._grpc.add_secure_port(settings.address, self._credentials)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(
                f"--address: cannot listen on {settings.address!r} (in use, or not a host:port "
                "of this machine)"
            )
        return port

    async def _start(self) -> None:
        await self._grpc.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> Server:
        if self.unprotected:
            log.warning(
                "PROTECTED MODE IS OFF (--unsafe-expose-without-auth 1): %s is reachable from "
                "other hosts and authenticates no caller; anyone who reaches it can read, change "
                "and delete every session. Give tokens (--auth-tokens-file) or require client "
                "certificates (--tls-client-ca) instead",
                self.address,
            )
        if self.settings.metrics_address not in ("", "off"):
            self.metrics_server = MetricsHTTPServer(
                self.settings.metrics_address, self.metrics.registry
            )
            self.metrics_address = self.metrics_server.address
        self._run(self._start())
        self._expiry.start()
        return self

    def _expire_idle(self) -> None:
        """Expires idle sessions, a few times per shortest TTL (at most once a second)."""
        while not self._stopped.wait(1.0):
            try:
                self.sessions.expire_idle()
            except Exception:  # a store error must not end expiry for good
                log.exception("expiring idle sessions failed; trying again")

    async def _stop(self, grace: float) -> None:
        # Health first: load balancers and probes see NOT_SERVING while calls in flight drain.
        await self.health.enter_graceful_shutdown()
        await self._grpc.stop(grace)

    def stop(self, grace: float | None = None) -> None:
        """Health turns NOT_SERVING, new calls are refused, calls in flight get ``grace`` seconds."""
        if self._stopped.is_set():
            return
        self._run(self._stop(self.settings.grace_seconds if grace is None else grace))
        if self.metrics_server is not None:
            self.metrics_server.stop()
        self._stopped.set()
        self.service.close()
        self._close_loop()
        try:
            self.store.close()  # after the calls: the durable store's last snapshot holds them all
        except Exception:  # what a store could not write is said; the stop goes on
            log.exception("closing the session store failed")

    def _close_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(0)


def start_server(
    settings: Settings | None = None,
    registry: CollectorRegistry | None = None,
    reuse_port: bool = False,
) -> Server:
    """Builds and starts a server (returns at once); ``Server.stop`` ends it."""
    return Server(settings or Settings.from_env(), registry, reuse_port).start()


def serve(settings: Settings | None = None) -> int:
    """Runs a server until SIGTERM or SIGINT, then drains it; returns the process exit code."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    index = os.environ.get(PROCESS_INDEX_ENV)
    try:
        settings.validate()
        if settings.processes > 1:
            from normserve.server._processes import serve_processes

            return serve_processes(settings)
        configure_process(settings)
        server = start_server(settings, reuse_port=index is not None)
    except (OSError, ValueError, ServiceError) as err:
        log.error("normserve cannot start: %s", err)
        return 2
    log.info(
        "normserve listening on %s (%s; device %s, %d compute workers; %s; %s)",
        server.address,
        server.transport_security,
        server.sessions.default_device,
        settings.workers,
        settings.store_description()
        + (f", process {index} of a group" if index is not None else ""),
        f"metrics on {server.metrics_address}" if server.metrics_address else "metrics off",
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
