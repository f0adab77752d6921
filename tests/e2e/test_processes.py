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


def _which(metrics: int, before: list[float]) -> int | None:
    """Which of the two processes (0, 1) served the Normalize calls made since ``before``."""
    now = [_served(metrics), _served(metrics + 1)]
    moved = [i for i in (0, 1) if now[i] > before[i]]
    return moved[0] if len(moved) == 1 else None


def test_a_synchronized_group_spread_over_two_processes(redis_server: RedisServer) -> None:
    """K = 4 ranks, two connections on each process (found through each process's metrics):
    one BatchNorm over the concatenation; a late rank on the other process is ABORTED with the
    step; a retry on the other process is replayed."""
    import grpc

    from normserve.v1 import normserve_pb2 as pb
    from normserve.v1 import normserve_pb2_grpc as pb_grpc
    from normserve.wire import tensor_from_proto, tensor_to_proto

    port, metrics = _free_ports(1), _free_ports(2)
    cmd = [sys.executable, "-m", "normserve.server", "--processes", "2"]
    cmd += ["--store", redis_server.url, "--address", f"127.0.0.1:{port}"]
    cmd += ["--metrics-address", f"127.0.0.1:{metrics}", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    channels: list[grpc.Channel] = []
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
            probe = admin.create_session(3).session_id
            sid = admin.create_session(3, sync_participants=4, sync_timeout=1).session_id
        # channels, each its own connection, until two reach each process
        by_process: list[list[pb_grpc.NormalizerStub]] = [[], []]
        for _ in range(64):
            if min(len(s) for s in by_process) >= 2:
                break
            channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            stub = pb_grpc.NormalizerStub(channel)
            before = [_served(metrics), _served(metrics + 1)]
            req = pb.NormalizeRequest(session_id=probe, mode=pb.MODE_EVAL)
            tensor_to_proto(torch.randn(2, 3), req.input)
            stub.Normalize(req, timeout=10)
            which = _which(metrics, before)
            if which is not None and len(by_process[which]) < 2:
                channels.append(channel)
                by_process[which].append(stub)
            else:
                channel.close()
        assert min(len(s) for s in by_process) >= 2, "the kernel kept one process"
        stubs = [by_process[0][0], by_process[1][0], by_process[0][1], by_process[1][1]]

        def request(x: torch.Tensor, rank: int, step: int) -> pb.NormalizeRequest:
            req = pb.NormalizeRequest(
                session_id=sid, mode=pb.MODE_TRAIN, sync=pb.SyncStep(rank=rank, step=step)
            )
            tensor_to_proto(x, req.input)
            return req

        bn = torch.nn.BatchNorm1d(3, affine=False)
        for step in range(2):
            xs = [torch.randn(2 + r, 3) * 2 + 3 for r in range(4)]
            futures = [
                stubs[r].Normalize.future(request(xs[r], r, step), timeout=30) for r in range(4)
            ]
            answers = [f.result() for f in futures]
            out = torch.cat([tensor_from_proto(a.output, "o") for a in answers])
            assert (out - bn(torch.cat(xs))).abs().max() < 1e-5
            assert {a.version for a in answers} == {step + 2}
        retry = stubs[1].Normalize(request(xs[0], 0, 1), timeout=30)  # rank 0, other process
        assert retry.replayed and retry.version == 3
        with Client(target) as admin:
            state = admin.export_state(sid)
        assert (state["running_mean"] - bn.running_mean).abs().max() < 1e-5
        assert (state["running_var"] - bn.running_var).abs().max() < 1e-5
        # step 2: ranks 0-2 arrive, rank 3 is late; the step aborts within its 1 s timeout
        x = torch.randn(3, 3)
        futures = [stubs[r].Normalize.future(request(x, r, 2), timeout=30) for r in range(3)]
        why = (
            f"forward step 2 of session {sid!r}: 1 of 4 participants (ranks 3) did not arrive "
            "within 1 seconds; nothing was applied"
        )
        for f in futures:
            with pytest.raises(grpc.RpcError) as err:
                f.result()
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.ABORTED, why)
        with pytest.raises(grpc.RpcError) as err:
            stubs[3].Normalize(request(x, 3, 2), timeout=30)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.ABORTED, why)
        with Client(target) as admin:
            assert admin.get_session(sid).num_batches_tracked == 2
    finally:
        for channel in channels:
            channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 0, proc.stderr.read() if proc.stderr else ""
