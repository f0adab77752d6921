"""``--processes N``: N server processes on one port, sharing a Redis store.

One Python process serves gRPC on one core's worth of interpreter (the GIL); more cores need
more processes. The parent picks the port (port 0: a free one, chosen once), starts N children
that bind it with SO_REUSEPORT (the kernel spreads new connections over them), forwards SIGTERM
and SIGINT to them, and restarts a child that dies (a crash, the OOM killer) after a second.
Sessions live in the shared store, so any child serves any session. Child i serves its metrics
on the metrics port + i (port 0: each picks one, as it logs).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import fields
from types import FrameType

from normserve.server._settings import Settings

__all__ = ["PROCESS_INDEX_ENV", "serve_processes"]

log = logging.getLogger("normserve.server")

#: Set in a child's environment: its index among the processes sharing the port.
PROCESS_INDEX_ENV = "NORMSERVE_INTERNAL_PROCESS_INDEX"
#: A child that exits within this many seconds of its start at the first start failed to start.
_START_SECONDS = 30.0


def _with_port(address: str, port: int) -> str:
    return f"{address.rpartition(':')[0]}:{port}"


def _free_port(address: str) -> int:
    host = address.rpartition(":")[0].strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _child_env(settings: Settings, index: int) -> dict[str, str]:
    env = dict(os.environ)
    for f in fields(Settings):
        env[f"NORMSERVE_{f.name.upper()}"] = str(getattr(settings, f.name))
    env["NORMSERVE_PROCESSES"] = "1"
    env[PROCESS_INDEX_ENV] = str(index)
    return env


class _Child:
    def __init__(self, settings: Settings, index: int) -> None:
        self.settings, self.index = settings, index
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.starts = 0

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "normserve.server"], env=_child_env(self.settings, self.index)
        )
        self.started = time.monotonic()
        self.starts += 1


def serve_processes(settings: Settings) -> int:
    """Runs ``settings.processes`` servers on one port until SIGTERM or SIGINT; returns the exit
    status (2 if a process cannot start)."""
    port = int(settings.address.rpartition(":")[2])
    if port == 0:
        port = _free_port(settings.address)
    metrics = settings.metrics_address
    children = []
    for i in range(settings.processes):
        child_metrics = metrics
        if metrics not in ("", "off"):
            mport = int(metrics.rpartition(":")[2])
            child_metrics = _with_port(metrics, mport + i if mport else 0)
        own = settings.replace(
            address=_with_port(settings.address, port), metrics_address=child_metrics
        )
        children.append(_Child(own, i))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("%s: stopping %d processes", signal.Signals(signum).name, len(children))
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        child.start()
    log.info(
        "normserve: %d processes on %s (%s)",
        len(children),
        _with_port(settings.address, port),
        settings.store_description(),
    )
    status = 0
    while not stop.wait(0.2):
        for child in children:
            assert child.proc is not None
            code = child.proc.poll()
            if code is None:
                continue
            early = time.monotonic() - child.started < _START_SECONDS
            if code == 2 and early and child.starts == 1:
                log.error("process %d cannot start (exit 2): stopping", child.index)
                status = 2
                stop.set()
                break
            log.warning(
                "process %d (pid %d) exited with %d; starting it again",
                child.index,
                child.proc.pid,
                code,
            )
            time.sleep(1.0)
            if not stop.is_set():
                child.start()
    for child in children:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.grace_seconds + 10
    for child in children:
        assert child.proc is not None
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()
    log.info("stopped")
    return status
