"""Chaos: a training loop rides through its server being killed (SIGKILL) again and again.

The client trains one session with at least 300 TRAIN calls while a killer kills the server at
random moments of the loop (at least 5 times) and starts it again on the same port. The client
retries through every outage (each batch keeps its idempotency key across tries). At the end the
running statistics and ``num_batches_tracked`` must equal an in-process torch BatchNorm fed
exactly the batches the client saw acknowledged: nothing lost, nothing counted twice.

Two stores: the local durable store in strict mode (the killed process is the whole server), and
Redis with ``--processes 2`` (the killed processes are normserve's; Redis lives). CI runs the
default size; ``NORMSERVE_CHAOS_CALLS`` and ``NORMSERVE_CHAOS_KILLS`` make a longer run.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from normserve.client import Client, RetryPolicy
from tests._redis import RedisServer

CALLS = int(os.environ.get("NORMSERVE_CHAOS_CALLS", "320"))
KILLS = int(os.environ.get("NORMSERVE_CHAOS_KILLS", "6"))
FEATURES = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


class Cluster:
    """normserve processes on one port, killed and started again by the test."""

    def __init__(self, flags: list[str], kill_children: bool) -> None:
        self.port = _free_port()
        self.flags = flags
        self.kill_children = kill_children  # --processes N: kill a child, the parent restarts it
        self.proc: subprocess.Popen[bytes] | None = None
        self.kills = 0
        self.log = open(os.devnull, "wb")  # noqa: SIM115

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [sys.executable, "-m", "normserve.server", "--address", self.address]
        cmd += ["--metrics-address", "off", "--device", "cpu", *self.flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log)

    def kill(self) -> None:
        assert self.proc is not None
        if self.kill_children:
            victims = _children(self.proc.pid)
            if not victims:
                return
            os.kill(random.choice(victims), signal.SIGKILL)
        else:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.start()
        self.kills += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randn(8, FEATURES, generator=g) * (1 + i % 5) + (i % 7)


def _train_through_kills(cluster: Cluster, kills: int) -> dict[str, object]:
    """The loop and the killer; returns what the client saw."""
    rng = random.Random(1234)
    # kill points spread over the loop, at random calls, while calls are in flight
    marks = sorted(rng.sample(range(10, CALLS - 10), kills))
    done = [0]
    stop = threading.Event()

    def killer() -> None:
        for mark in marks:
            while done[0] < mark and not stop.is_set():
                time.sleep(0.001)
            if stop.is_set():
                return
            time.sleep(rng.uniform(0, 0.01))  # mid-call, mid-commit: anywhere
            cluster.kill()

    policy = RetryPolicy(seconds=120, initial_backoff=0.05, max_backoff=0.5)
    with Client(cluster.address, timeout=120, retry=policy) as client:
        _wait_serving(client)
        session_id = client.create_session(FEATURES, momentum=0.1, session_id="chaos").session_id
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        acknowledged = []
        replayed = versions = 0
        t0 = time.monotonic()
        try:
            for i in range(CALLS):
                key = f"chaos-{i}"
                while True:  # a try that outlived the client's retry budget: same key again
                    try:
                        r = client.normalize(session_id, _batch(i), idempotency_key=key)
                        break
                    except Exception as err:
                        if time.monotonic() - t0 > 600:
                            raise AssertionError(f"batch {i} never acknowledged: {err}") from err
                acknowledged.append(i)
                replayed += r.replayed
                versions = max(versions, r.version)
                done[0] = i + 1
        finally:
            stop.set()
            thread.join(10)
        info = client.get_session(session_id)
    return {
        "acknowledged": acknowledged,
        "info": info,
        "replayed": replayed,
        "seconds": time.monotonic() - t0,
    }


def _wait_serving(client: Client) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if client.health() == "SERVING":
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not start")


def _check_against_torch(seen: dict[str, object]) -> None:
    acknowledged = seen["acknowledged"]
    assert isinstance(acknowledged, list)
    bn = torch.nn.BatchNorm1d(FEATURES, momentum=0.1)
    bn.train()
    for i in acknowledged:
        bn(_batch(i))
    info = seen["info"]
    assert info.num_batches_tracked == len(acknowledged) == CALLS  # type: ignore[attr-defined]
    torch.testing.assert_close(info.running_mean, bn.running_mean, rtol=0, atol=1e-6)  # type: ignore[attr-defined]
    torch.testing.assert_close(info.running_var, bn.running_var, rtol=0, atol=1e-6)  # type: ignore[attr-defined]


def _report(name: str, cluster: Cluster, seen: dict[str, object]) -> None:
    info = seen["info"]
    bn_err = "within 1e-6"
    print(  # the closing note's figures (pytest -s)
        f"\n[chaos {name}] {CALLS} TRAIN calls, {cluster.kills} SIGKILLs, "
        f"{seen['replayed']} answers replayed, num_batches_tracked "
        f"{info.num_batches_tracked} (version {info.version}), statistics {bn_err}, "  # type: ignore[attr-defined]
        f"{seen['seconds']:.1f} s"
    )


def _run(name: str, cluster: Cluster, prepare: Callable[[], None] = lambda: None) -> None:
    prepare()
    cluster.start()
    try:
        seen = _train_through_kills(cluster, KILLS)
    finally:
        cluster.stop()
    assert cluster.kills >= min(KILLS, 5)
    _check_against_torch(seen)
    _report(name, cluster, seen)


@pytest.mark.timeout(600)
def test_strict_local_store_survives_sigkill(tmp_path: Path) -> None:
    flags = ["--state-dir", str(tmp_path / "state"), "--durability", "strict"]
    _run("strict local store", Cluster(flags, kill_children=False))


@pytest.mark.timeout(600)
def test_redis_store_survives_killed_normserve_processes(redis_server: RedisServer) -> None:
    flags = ["--store", redis_server.url, "--processes", "2"]
    _run("redis store, 2 processes", Cluster(flags, kill_children=True))
