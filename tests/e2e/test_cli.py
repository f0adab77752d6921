"""The CLI as a user runs it: `normserve serve` as a subprocess (on port 0, the bound port read
back from its log), operator commands, SIGTERM, and the client CLI's independence from the server."""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from importlib import import_module
from pathlib import Path

import grpc
import pytest
import torch

from normserve.client import Client, DeadlineExceededError, NormserveError, UnavailableError
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
    ttl = run("session", "create", "2", "--id", "brief", "--ttl", "90", "--target", target)
    assert ttl.returncode == 0, ttl.stderr
    brief = json.loads(run("session", "show", "brief", "--json", "--target", target).stdout)
    assert brief["ttl_seconds"] == 90 and brief["expire_time"] is not None
    assert "(after 90 s unused)" in run("session", "show", "brief", "--target", target).stdout


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
                except NormserveError as err:  # grpc.aio cancels a call that lands mid-shutdown
                    if err.code is grpc.StatusCode.CANCELLED:
                        break
                    raise
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
        (["--processes", "2"], "--processes: more than one process needs a shared store"),
        (["--durability", "eventual"], "--durability: expected interval or strict"),
        (["--store", "redis-cluster://x"], "--store: expected memory or redis://HOST:PORT/DB"),
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
    assert shown.stdout.startswith("usage: normserve serve ")
    same = subprocess.run(
        [sys.executable, "-m", "normserve.server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NORMSERVE_PROG": "normserve serve"},
    )
    assert shown.stdout == same.stdout
    assert run_server("--help").stdout.startswith("usage: python -m normserve.server ")
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
heavy = ("normserve.server", "prometheus_client", "grpc_reflection.v1alpha", "torch")
print("--- loaded:", *sorted(m for m in sys.modules for h in heavy if (m + ".").startswith(h + ".")))
"""


@pytest.mark.parametrize(
    "args", [["session", "list", "--help"], ["--help"], ["health", "--help"], ["bench", "--help"]]
)
def test_client_cli_imports_nothing_of_the_server(args: list[str]) -> None:
    """`normserve session ...` and friends load neither the server, its dependencies, nor torch."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    shown, _, loaded = done.stdout.rpartition("--- loaded:")
    assert shown.startswith("usage: normserve"), done.stdout
    assert loaded.split() == []


def _loaded(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Runs the client CLI in a fresh interpreter: what it did, and the heavy modules it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *args], capture_output=True, text=True, timeout=120
    )
    return done, done.stdout.rpartition("--- loaded:")[2].split()


def test_operator_commands_load_no_torch(served: tuple[subprocess.Popen[str], str]) -> None:
    """Operator commands start in a fraction of torch's import time: they never load it."""
    _, target = served
    commands = [
        ["--version"],
        ["health"],
        ["session", "create", "3", "--id", "light"],
        ["session", "list"],
        ["session", "show", "light"],
        ["session", "reset", "light"],
        ["session", "export", "light"],
        ["session", "delete", "light"],
        ["session", "show", "light"],  # a failure too
    ]
    shown = {}
    for args in commands:
        done, loaded = _loaded(*args, *(["--target", target] if args[0] != "--version" else []))
        assert loaded == [], (args, loaded)
        assert "Traceback" not in done.stderr, done.stderr
        shown[" ".join(args)] = done
    assert "running_var  [1, 1, 1]" in shown["session reset light"].stdout  # decoded, no torch
    assert "NOT_FOUND" in shown["session show light"].stderr  # the second show: after delete


def _json(*args: str) -> tuple[int, object]:
    done = run(*args, "--json")
    assert done.stderr == "", done.stderr  # everything is in the one document
    return done.returncode, json.loads(done.stdout)


def test_json_is_one_document_for_every_command(
    served: tuple[subprocess.Popen[str], str], tmp_path: Path
) -> None:
    _, target = served
    t = ["--target", target]
    rc, doc = _json("health", *t)
    assert rc == 0 and doc == {"target": target, "service": "", "status": "SERVING"}
    rc, doc = _json("session", "create", "2", "--id", "js", *t)
    assert rc == 0 and isinstance(doc, dict) and doc["session_id"] == "js"
    assert doc["running_var"] == [1.0, 1.0] and doc["momentum"] == 0.1
    rc, doc = _json("session", "list", *t)
    assert rc == 0 and isinstance(doc, list) and [s["session_id"] for s in doc] == ["js"]
    rc, doc = _json("session", "export", "js", *t)
    assert rc == 0 and doc == {
        "weight": [1.0, 1.0],
        "bias": [0.0, 0.0],
        "running_mean": [0.0, 0.0],
        "running_var": [1.0, 1.0],
        "num_batches_tracked": 0,
    }
    state = tmp_path / "js.pt"
    rc, doc = _json("session", "export", "js", "-o", str(state), *t)
    assert rc == 0 and isinstance(doc, dict) and doc["file"] == str(state)
    rc, doc = _json("session", "import", "js", str(state), *t)
    assert rc == 0 and isinstance(doc, dict) and doc["session"]["version"] == 2
    rc, doc = _json("session", "reset", "js", *t)
    assert rc == 0 and isinstance(doc, dict) and doc["num_batches_tracked"] == 0
    rc, doc = _json("session", "delete", "js", *t)
    assert rc == 0 and doc == {"deleted": "js"}
    # failures: the server's, a local one, and wrong arguments, each one document, exit non-zero
    rc, doc = _json("session", "delete", "js", *t)
    assert rc == 1 and doc == {
        "error": {"code": "NOT_FOUND", "message": "session 'js' not found", "hint": ""}
    }
    rc, doc = _json("session", "import", "js", str(tmp_path / "missing.pt"), *t)
    assert rc == 1 and isinstance(doc, dict) and "missing.pt" in doc["error"]["message"]
    rc, doc = _json("session", "create", "many", *t)
    assert rc == 2 and isinstance(doc, dict) and doc["error"]["code"] == "USAGE"
    assert "invalid int value: 'many'" in doc["error"]["message"]


def _closed_port() -> tuple[socket.socket, int]:
    """A port that refuses connections: bound (so nothing else takes it), never listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def test_connection_errors_say_what_to_check() -> None:
    sock, port = _closed_port()
    with sock:
        done = run("health", "--target", f"127.0.0.1:{port}", "--timeout", "5")
    assert done.returncode == 1
    assert f"hint: is the server running at 127.0.0.1:{port}?" in done.stderr, done.stderr
    # an HTTP/1 server where gRPC was expected (normserve's own metrics port is one)
    with http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        target = f"127.0.0.1:{httpd.server_address[1]}"
        rc, doc = _json("health", "--target", target, "--timeout", "5")
        httpd.shutdown()
    assert rc == 1 and isinstance(doc, dict) and doc["error"]["code"] == "UNAVAILABLE"
    assert "not in gRPC: is it normserve's metrics port" in doc["error"]["hint"]


def test_a_taken_port_is_one_clean_line(served: tuple[subprocess.Popen[str], str]) -> None:
    _, target = served
    done = run("serve", "--address", target, "--metrics-address", "off")
    assert done.returncode == 2
    assert f"--address: {target} is already in use" in done.stderr
    assert "add_port" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_freeze_calibrate_and_adaptation_commands(
    served: tuple[subprocess.Popen[str], str],
) -> None:
    _, target = served
    t = ["--target", target]
    assert run("session", "create", "3", "--id", "cal", *t).returncode == 0
    rc, doc = _json("session", "calibrate-start", "cal", *t)
    assert rc == 0 and isinstance(doc, dict) and doc["calibrating"] and doc["version"] == 2
    xs = [torch.randn(5, 3) * 2 + 1, torch.randn(9, 3) - 4]
    with Client(target) as client:
        for x in xs:
            client.normalize("cal", x, mode="calibrate")
    shown = run("session", "show", "cal", *t).stdout
    assert re.search(r"^calibrating  since \S+: 2 batches, 14 samples$", shown, re.M), shown
    rc, doc = _json("session", "calibrate-commit", "cal", *t)
    assert rc == 0 and isinstance(doc, dict) and not doc["calibrating"]
    want = torch.cat(xs).double().var(dim=0)
    torch.testing.assert_close(torch.tensor(doc["running_var"]).double(), want, rtol=1e-6, atol=0)
    rc, doc = _json("session", "calibrate-abort", "cal", *t)
    assert rc == 1 and doc == {
        "error": {
            "code": "FAILED_PRECONDITION",
            "message": "session 'cal' is not calibrating: AbortCalibration needs "
            "StartCalibration first (`normserve session calibrate-start cal`)",
            "hint": "",
        }
    }
    rc, doc = _json("session", "freeze", "cal", *t)
    assert rc == 0 and isinstance(doc, dict) and doc["frozen"]
    assert "frozen       true" in run("session", "show", "cal", *t).stdout
    reset = run("session", "reset", "cal", *t)
    assert reset.returncode == 1
    assert reset.stderr.strip() == (
        "normserve: FAILED_PRECONDITION: session 'cal' is frozen: it refuses to reset; "
        "unfreeze it first (UnfreezeSession; `normserve session unfreeze cal`)"
    )
    rc, doc = _json("session", "unfreeze", "cal", *t)
    assert rc == 0 and isinstance(doc, dict) and not doc["frozen"]
    with Client(target) as client:
        client.normalize("cal", torch.randn(8, 3), adapt=0.5, adapt_accumulate=True)
    rc, doc = _json("session", "show", "cal", *t)
    assert rc == 0 and isinstance(doc, dict) and doc["adapted_batches"] == 1
    adapted = doc["adapted_mean"]
    rc, doc = _json("session", "adaptation-promote", "cal", *t)
    assert rc == 0 and isinstance(doc, dict) and doc["running_mean"] == adapted
    assert doc["adapted_batches"] is None
    rc, doc = _json("session", "adaptation-reset", "cal", *t)
    assert rc == 0 and isinstance(doc, dict) and doc["adapted_batches"] is None
