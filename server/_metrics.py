"""The server's Prometheus metrics, on an injected registry (each server and each test its own).

Latencies are histograms in seconds (aggregatable across replicas, unlike summaries), with buckets
from 50 us to 10 s. Names follow Prometheus conventions: ``normserve_`` prefix, base units,
``_total`` on counters.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

__all__ = ["LATENCY_BUCKETS", "Metrics", "MetricsHTTPServer"]

LATENCY_BUCKETS = (
    50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

STAGES = ("decode", "wait", "compute", "encode")


class Metrics:
    """Every metric normserve exports. Hot-path children are cached per label tuple, because
    ``.labels()`` costs a lock and a dict lookup on every call otherwise."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        if process:
            ProcessCollector(registry=r)
        self.rpc_duration = Histogram(
            "normserve_rpc_duration_seconds",
            "End-to-end time the server spent on an RPC, by method, session kind, mode and status.",
            ["method", "kind", "mode", "code"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "normserve_stage_duration_seconds",
            "Time per stage inside the server: decode (bytes to tensor), wait (for the session's "
            "update lock), compute (kernels; synchronized on CUDA), encode (tensor to bytes).",
            ["method", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "normserve_requests",
            "RPCs finished, by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self.received_bytes = Counter(
            "normserve_received_bytes",
            "Serialized request bytes received, by method.",
            ["method"],
            registry=r,
        )
        self.sent_bytes = Counter(
            "normserve_sent_bytes",
            "Serialized response bytes sent, by method.",
            ["method"],
            registry=r,
        )
        self.elements = Counter(
            "normserve_normalized_elements",
            "Tensor elements normalized (or reduced, with statistics_only), by kind and mode.",
            ["kind", "mode"],
            registry=r,
        )
        self.applied = Counter(
            "normserve_applied_batches",
            "Batches folded into running statistics (TRAIN calls that updated a session).",
            ["kind"],
            registry=r,
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
        self._children: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached."""
        key = (id(metric), *labels)
        c = self._children.get(key)
        if c is None:
            with self._lock:
                c = self._children[key] = metric.labels(*labels)
        return c

    def track_sessions(self, count: Callable[[], int]) -> None:
        self.sessions.set_function(lambda: float(count()))


def _allocated(device: int) -> Callable[[], float]:
    return lambda: float(torch.cuda.memory_allocated(device))


class MetricsHTTPServer:
    """``/metrics`` on its own port (``host:port``; port 0 picks one)."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, _, port = address.rpartition(":")
        self._httpd, self._thread = start_http_server(int(port), host or "0.0.0.0", registry)
        self.port = self._httpd.server_port
        self.address = f"{host}:{self.port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
