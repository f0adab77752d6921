"""The CLI as a user runs it: `normserve serve` as a subprocess (on port 0, the bound port read
back from its log), operator commands, SIGTERM, and the client CLI's independence from the server."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import pytest
import torch

from normserve.client import Client, DeadlineExceededError, UnavailableError
from normserve.server import Settings

CLI = [sys.executable, "-m", "normserve"]
ROOT = Path(__file__).resolve().parents[2]


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
        match = re.search(r"normserve listening on (\S+:\d+)", line)
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


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "normserve.server", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


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
    answered = threading.Event()  # the first batch is answered: the stream is open on the server
    refusing = threading.Event()  # the server refuses new calls: it is draining

    def batches() -> Iterator[torch.Tensor]:
        yield torch.randn(8, 3)
        refusing.wait(30)  # SIGTERM lands here, mid-stream
        yield torch.randn(8, 3)

    with Client(target) as client:
        sid = client.create_session(3).session_id
        results: list[int] = []

        def consume() -> None:
            for r in client.normalize_stream(sid, batches()):
                results.append(r.version)
                answered.set()

        t = threading.Thread(target=consume)
        t.start()
        try:
            assert answered.wait(30)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while True:  # new calls are refused once the server has taken the signal
                try:
                    # (a call that races the signal can wait until the grace ends: grpc.aio does
                    # not run it, nor refuse it, so each try is short)
                    client.list_sessions(timeout=1)
                except UnavailableError:
                    break
                except DeadlineExceededError:
                    pass
                assert time.monotonic() < deadline, "new calls still accepted 10 s after SIGTERM"
                time.sleep(0.02)
        finally:
            refusing.set()
            t.join(30)
    assert results == [2, 3]  # the stream in flight was answered to its end
    assert proc.wait(20) == 0  # the server's own exit status: `serve` replaced its process


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
    # port 0 for both: a server already on the default ports must not change the outcome
    done = run("serve", "--address", "127.0.0.1:0", "--metrics-address", "127.0.0.1:0", *flags)
    assert done.returncode == 2
    assert "normserve cannot start: " + message in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_help_is_the_servers() -> None:
    """`normserve serve --help` is the server's own help: every Settings field as a flag."""
    shown = run("serve", "--help")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == run_server("--help").stdout
    for f in dataclasses.fields(Settings):
        assert f"--{f.name.replace('_', '-')} " in shown.stdout, f.name


def test_console_scripts_resolve() -> None:
    """pyproject's [project.scripts] (normserve, normserve-server) name functions that exist."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"normserve", "normserve-server"} <= set(scripts)
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(import_module(module), name)), target


# Runs the client CLI in a fresh interpreter, then lists the server-side modules it loaded.
_LOADED = """
import sys
from normserve.client._cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
# (grpc's own __init__ imports the bare grpc_reflection package; the service is in v1alpha)
heavy = ("normserve.server", "prometheus_client", "grpc_reflection.v1alpha")
print("--- loaded:", *sorted(m for m in sys.modules for h in heavy if (m + ".").startswith(h + ".")))
"""


@pytest.mark.parametrize(
    "args", [["session", "list", "--help"], ["--help"], ["health", "--help"], ["bench", "--help"]]
)
def test_client_cli_imports_nothing_of_the_server(args: list[str]) -> None:
    """`normserve session ...` and friends load neither the server nor its dependencies."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    shown, _, loaded = done.stdout.rpartition("--- loaded:")
    assert shown.startswith("usage: normserve"), done.stdout
    assert loaded.split() == []
