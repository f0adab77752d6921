"""The CLI as a user runs it: `normserve serve` as a subprocess, operator commands, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from normserve.client import Client, UnavailableError

CLI = [sys.executable, "-m", "normserve"]


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [
            *CLI,
            "serve",
            "--address",
            "127.0.0.1:0",
            "--metrics-address",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--grace-seconds",
            "5",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    target = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        match = re.search(r"listening on (\S+)", line)
        if match:
            target = match.group(1)
            break
        if not line and proc.poll() is not None:
            break
    assert target, "the server did not report its address"
    # Keep draining stderr so the server never blocks on a full pipe.
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    yield proc, target
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_operator_commands(served: tuple[subprocess.Popen[str], str], tmp_path: Path) -> None:
    _, target = served
    created = run("session", "create", "4", "--id", "ops", "--cumulative", "--target", target)
    assert created.returncode == 0, created.stderr
    assert created.stdout.strip() == "ops"
    with Client(target) as client:
        client.normalize("ops", torch.randn(8, 4) + 2)
    listed = run("session", "list", "--target", target)
    assert re.search(r"^ops\s+4\s+cpu\s+2\s+1$", listed.stdout, re.M), listed.stdout
    shown = json.loads(run("session", "show", "ops", "--json", "--target", target).stdout)
    assert shown["momentum"] is None and shown["num_batches_tracked"] == 1
    out = tmp_path / "ops.pt"
    assert run("session", "export", "ops", "-o", str(out), "--target", target).returncode == 0
    bn = torch.nn.BatchNorm1d(4)
    bn.load_state_dict(torch.load(out, weights_only=True))
    assert int(bn.num_batches_tracked) == 1
    missing = run("session", "show", "nope", "--target", target)
    assert missing.returncode == 1
    assert missing.stderr.strip() == "normserve: NOT_FOUND: session 'nope' not found"
    assert run("session", "delete", "ops", "--target", target).returncode == 0
    assert run("health", "--target", target).stdout.strip() == "SERVING"


def test_sigterm_finishes_the_stream_in_flight(served: tuple[subprocess.Popen[str], str]) -> None:
    proc, target = served
    sent_first = threading.Event()

    def batches() -> Iterator[torch.Tensor]:
        yield torch.randn(8, 3)
        sent_first.set()
        time.sleep(1.0)  # SIGTERM lands here, mid-stream
        yield torch.randn(8, 3)

    with Client(target) as client:
        sid = client.create_session(3).session_id
        results: list[int] = []

        def consume() -> None:
            results.extend(r.version for r in client.normalize_stream(sid, batches()))

        t = threading.Thread(target=consume)
        t.start()
        assert sent_first.wait(10)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(UnavailableError):  # new calls are refused while draining
            client.list_sessions(timeout=5)
        t.join(20)
    assert results == [2, 3]
    assert proc.wait(20) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "tpu"], "--device: unknown device 'tpu'; expected auto, cpu, cuda or cuda:N"),
        (["--metrics-address", "nonsense"], "--metrics-address: expected host:port or off"),
        (["--grace-seconds", "-1"], "--grace-seconds: must be >= 0, got -1.0"),
        (["--address", "no-such-host:1"], "--address: cannot listen on 'no-such-host:1'"),
    ],
)
def test_serve_refuses_bad_settings_clearly(flags: list[str], message: str) -> None:
    done = run("serve", "--metrics-address", "127.0.0.1:0", *flags)
    assert done.returncode == 2
    assert "normserve cannot start: " + message in done.stderr
    assert "Traceback" not in done.stderr
