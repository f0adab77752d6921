"""The server's Prometheus metrics, on an injected registry (each server and each test its own).

Latencies are histograms in seconds (aggregatable across replicas, unlike summaries), with buckets
from 50 us to 10 s. Names follow Prometheus conventions: ``normserve_`` prefix, base units,
``_total`` on counters.
"""

from __future__ import annotations

import platform
import threading
from bisect import bisect_left
from collections.abc import Callable
from typing import Any

import grpc
import torch
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

import normserve

__all__ = ["LATENCY_BUCKETS", "Metrics", "MetricsHTTPServer"]

LATENCY_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

STAGES = ("decode", "wait", "compute", "encode")


class _Histograms:
    """A family of histograms kept as plain per-bucket counts (bisect, then one increment)."""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        row = self.series.get(key)
        if row is None:
            # one count per bucket (the last for +Inf), then the sum
            row = self.series[key] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        row[bisect_left(LATENCY_BUCKETS, value)] += 1
        row[-1] += value

    def family(self) -> HistogramMetricFamily:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labelnames)
        bounds = [*(repr(float(b)) for b in LATENCY_BUCKETS), "+Inf"]
        for key, row in self.series.items():
            cumulative, buckets = 0.0, []
            for bound, count in zip(bounds, row[:-1], strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            fam.add_metric(list(key), buckets, row[-1])
        return fam


class _Counters:
    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...]) -> None:
        self.name, self.doc, self.labelnames = name, doc, labelnames
        self.series: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], value: float = 1.0) -> None:
        self.series[key] = self.series.get(key, 0.0) + value

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labelnames)
        for key, value in self.series.items():
            fam.add_metric(list(key), value)
        return fam


class _HotPath(Collector):
    """The metrics every call touches. A call records all of its observations in one step under
    one lock: with prometheus_client's own Histogram and Counter each observation takes a lock and
    walks the buckets in Python, a dozen per call, which cost more than the call's own arithmetic
    on small batches. Exposition is the same: standard histogram and counter families."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rpc = _Histograms(
            "normserve_rpc_duration_seconds",
            "End-to-end time the server spent on an RPC, by method, session kind, mode and status.",
            ("method", "kind", "mode", "code"),
        )
        self.stage = _Histograms(
            "normserve_stage_duration_seconds",
            "Time per stage inside the server: decode (bytes to tensor), wait (for the session's "
            "update lock), compute (kernels; synchronized on CUDA), encode (tensor to bytes).",
            ("method", "stage"),
        )
        self.requests = _Counters(
            "normserve_requests", "RPCs finished, by method and status code.", ("method", "code")
        )
        self.tenant_requests = _Counters(
            "normserve_tenant_requests",
            'RPCs finished, by tenant and status code (tenant "": health checks, and calls '
            "refused before their caller was known).",
            ("tenant", "code"),
        )
        self.quota_rejections = _Counters(
            "normserve_quota_rejections",
            "Calls refused with RESOURCE_EXHAUSTED for a tenant's quota, by tenant and quota "
            "(sessions, session_bytes, streams, inflight_bytes, rps).",
            ("tenant", "quota"),
        )
        self.received = _Counters(
            "normserve_received_bytes", "Serialized request bytes received, by method.", ("method",)
        )
        self.sent = _Counters(
            "normserve_sent_bytes", "Serialized response bytes sent, by method.", ("method",)
        )
        self.elements = _Counters(
            "normserve_normalized_elements",
            "Tensor elements normalized (or reduced, with statistics_only), by kind and mode.",
            ("kind", "mode"),
        )
        self.applied = _Counters(
            "normserve_applied_batches",
            "Batches folded into running statistics (TRAIN calls that updated a session).",
            ("kind",),
        )

    def collect(self) -> Any:
        with self.lock:
            families = [
                self.rpc.family(),
                self.stage.family(),
                self.requests.family(),
                self.tenant_requests.family(),
                self.quota_rejections.family(),
                self.received.family(),
                self.sent.family(),
                self.elements.family(),
                self.applied.family(),
            ]
        yield from families


class Metrics:
    """Every metric normserve exports, and the two calls the hot path makes to record them."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
        self.hot = _HotPath()
        r.register(self.hot)
        Info("normserve_build", "Versions this server runs.", registry=r).info(
            {
                "version": normserve.__version__,
                "torch": torch.__version__,
                "grpc": grpc.__version__,
                "python": platform.python_version(),
            }
        )
        self.sessions = Gauge("normserve_sessions", "Live sessions.", registry=r)
        self.inflight = Gauge(
            "normserve_inflight_calls", "RPCs in progress, by method.", ["method"], registry=r
        )
        self.open_streams = Gauge(
            "normserve_open_streams", "NormalizeStream calls currently open.", registry=r
        )
        if torch.cuda.is_available():
            memory = Gauge(
                "normserve_device_memory_bytes",
                "CUDA memory allocated by tensors, by device.",
                ["device"],
                registry=r,
            )
            for i in range(torch.cuda.device_count()):
                memory.labels(f"cuda:{i}").set_function(_allocated(i))

    def record_call(
        self, method: str, kind: str, mode: str, code: str, seconds: float, tenant: str = ""
    ) -> None:
        h = self.hot
        with h.lock:
            h.rpc.observe((method, kind, mode, code), seconds)
            h.requests.inc((method, code))
            h.tenant_requests.inc((tenant, code))

    def record_quota_rejection(self, tenant: str, quota: str) -> None:
        """A call of ``tenant`` refused for its quota ``quota``."""
        h = self.hot
        with h.lock:
            h.quota_rejections.inc((tenant, quota))

    def track_quotas(self, usage: Callable[[], dict[str, dict[str, int]]]) -> None:
        """Gauges of what each tenant holds against its quotas: ``usage()`` gives, by tenant,
        its sessions, session_bytes, streams and inflight_bytes."""
        self.registry.register(_QuotaUsage(usage))

    def record_batch(
        self,
        method: str,
        kind: str,
        mode: str,
        stages: tuple[float, float, float, float],
        elements: int,
        applied: bool,
    ) -> None:
        """One batch: its (decode, wait, compute, encode) seconds and counts."""
        h = self.hot
        with h.lock:
            for stage, seconds in zip(STAGES, stages, strict=True):
                h.stage.observe((method, stage), seconds)
            h.elements.inc((kind, mode), elements)
            if applied:
                h.applied.inc((kind,))

    def track_sessions(self, count: Callable[[], int]) -> None:
        self.sessions.set_function(lambda: float(count()))

    def track_expired_sessions(self, count: Callable[[], int]) -> None:
        """``normserve_sessions_expired_total``: sessions this process deleted after their idle
        TTL (Redis deletes its own: 0 with the Redis store)."""
        doc = "Sessions this process deleted after their idle TTL (Redis expires its own)."
        self.registry.register(_Total("normserve_sessions_expired", doc, count))


class _Total(Collector):
    """A counter whose value another object keeps."""

    def __init__(self, name: str, doc: str, value: Callable[[], int]) -> None:
        self.name, self.doc, self.value = name, doc, value

    def collect(self) -> Any:
        yield CounterMetricFamily(self.name, self.doc, value=float(self.value()))


class _QuotaUsage(Collector):
    GAUGES = (
        ("sessions", "normserve_tenant_sessions", "Sessions a tenant holds (--quota-sessions)."),
        (
            "session_bytes",
            "normserve_tenant_session_bytes",
            "Bytes of session state a tenant holds (--quota-session-bytes).",
        ),
        (
            "streams",
            "normserve_tenant_open_streams",
            "NormalizeStream calls a tenant has open (--quota-streams).",
        ),
        (
            "inflight_bytes",
            "normserve_tenant_inflight_bytes",
            "Request bytes of a tenant being processed (--quota-inflight-bytes).",
        ),
    )

    def __init__(self, usage: Callable[[], dict[str, dict[str, int]]]) -> None:
        self._usage = usage

    def collect(self) -> Any:
        usage = self._usage()
        for key, name, doc in self.GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=("tenant",))
            for tenant, held in sorted(usage.items()):
                fam.add_metric([tenant], float(held[key]))
            yield fam


def _allocated(device: int) -> Callable[[], float]:
    return lambda: float(torch.cuda.memory_allocated(device))


class MetricsHTTPServer:
    """``/metrics`` on its own port (``host:port``; port 0 picks one)."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, _, port = address.rpartition(":")
        if not port.isdigit():
            raise ValueError(f"--metrics-address: expected host:port or off, got {address!r}")
        try:
            self._httpd, self._thread = start_http_server(int(port), host or "0.0.0.0", registry)
        except OSError as err:
            raise OSError(
                f"--metrics-address: cannot listen on {address!r}: {err} (another server's "
                "metrics? choose another host:port, port 0 for a free one, or off)"
            ) from None
        self.port = self._httpd.server_port
        self.address = f"{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
