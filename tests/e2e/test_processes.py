"""``normserve serve --processes N``: N processes on one port, sharing a Redis store."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from normserve.client import Client
from normserve.server import Settings
from tests._redis import RedisServer


def _free_ports(n: int) -> int:
    """A port p such that p .. p+n-1 were all free a moment ago."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
    raise RuntimeError("no run of free ports")


def _served(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    found = re.search(
        rb'normserve_requests_total\{code="OK",method="Normalize"\} (\S+)', text
    ) or re.search(rb'normserve_requests_total\{method="Normalize",code="OK"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def test_processes_share_one_port_and_every_session(redis_server: RedisServer) -> None:
    port, metrics = _free_ports(1), _free_ports(2)
    cmd = [sys.executable, "-m", "normserve.server", "--processes", "2"]
    cmd += ["--store", redis_server.url, "--address", f"127.0.0.1:{port}"]
    cmd += ["--metrics-address", f"127.0.0.1:{metrics}", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(target, timeout=2, retry=0) as c:
                    if c.health() == "SERVING":
                        break
            except Exception:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
        time.sleep(1.0)  # both children listening
        with Client(target) as admin:
            sid = admin.create_session(4, momentum=None).session_id
        bn = torch.nn.BatchNorm1d(4, momentum=None)
        calls = 0
        # the kernel spreads connections: many channels, each its own connection
        for i in range(16):
            with Client(target, options=[("grpc.use_local_subchannel_pool", 1)]) as c:
                for _ in range(3):
                    x = torch.randn(8, 4) + i
                    c.normalize(sid, x)
                    bn(x)
                    calls += 1
        with Client(target) as admin:
            info = admin.get_session(sid)
        assert info.num_batches_tracked == calls
        torch.testing.assert_close(info.running_var, bn.running_var, rtol=0, atol=1e-5)
        served = [_served(metrics), _served(metrics + 1)]
        assert sum(served) == calls and min(served) > 0, served
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read() if proc.stderr else ""


def test_processes_need_a_shared_store() -> None:
    with pytest.raises(ValueError, match="shared store"):
        Settings(processes=2).validate()
    with pytest.raises(ValueError, match="exclude"):
        Settings(store="redis://127.0.0.1:6379/0", state_dir="/tmp/x").validate()
    with pytest.raises(ValueError, match="--store"):
        Settings(store="postgres://x").validate()
    Settings(processes=2, store="redis://127.0.0.1:6379/0").validate()
    with pytest.raises(ValueError, match="--state-dir is one process's store"):
        Settings(processes=2, state_dir="/tmp/x").validate()
    with pytest.raises(ValueError, match="--durability: applies to the local durable store"):
        Settings(durability="strict").validate()  # no --state-dir: nothing would be durable
    with pytest.raises(ValueError, match="--snapshot-interval: applies"):
        Settings(store="redis://127.0.0.1:6379/0", snapshot_interval=1).validate()
    with pytest.raises(ValueError, match="database of redis://HOST:PORT/DB is a number"):
        Settings(store="redis://127.0.0.1:6379/abc").validate()


def test_a_store_password_never_reaches_a_message() -> None:
    with pytest.raises(ValueError) as info:
        Settings(store="mongodb://user:hunter2@host/db").validate()
    assert "hunter2" not in str(info.value)
    settings = Settings(store="redis://:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in settings.store_description()
