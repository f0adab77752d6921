"""scripts/_env.sh (behind scripts/serve and scripts/test) installs the CPU build of torch by default:
on an index whose torch is the CUDA build, it stops before downloading anything and says how to
choose. Proved against a local package index of stand-in wheels, so nothing is fetched."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A minimal, installable wheel: metadata only."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    files = {
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\n"
        f"Name: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for arc, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{arc},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    with zipfile.ZipFile(path, "w") as zf:
        for arc, text in files.items():
            zf.writestr(arc, text)


def _setup(tmp_path: Path, wheels: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "NORMSERVE_"))}
    clean.update(
        PIP_CONFIG_FILE=os.devnull,  # no pip config of this machine: only the index below
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(wheels),
        NORMSERVE_VENV=str(tmp_path / "venv"),
        PYTHON=sys.executable,
        **env,
    )
    return subprocess.run(
        ["bash", "-c", f"source {ROOT / 'scripts/_env.sh'} && echo READY"],
        capture_output=True,
        text=True,
        env=clean,
        timeout=300,
    )


@pytest.mark.slow
def test_a_cuda_only_index_stops_setup_before_any_download(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    # what the standard index offers on Linux: torch that pulls the nvidia-* packages
    _wheel(wheels, "torch", "2.13.0", ["nvidia-cublas-cu12==12.8.4.1"])
    _wheel(wheels, "nvidia-cublas-cu12", "12.8.4.1", [])
    done = _setup(tmp_path, wheels)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "READY" not in done.stdout
    assert "is the CUDA build of torch" in done.stderr
    assert "NORMSERVE_TORCH_INDEX_URL" in done.stderr and "NORMSERVE_TORCH_SPEC" in done.stderr
    venv_python = tmp_path / "venv" / "bin" / "python"
    listed = subprocess.run(
        [str(venv_python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True
    ).stdout
    assert "torch" not in listed and "nvidia" not in listed  # nothing was installed
    # asking for it explicitly is honoured: the refusal is gone (setup then installs normserve,
    # whose dependencies this stand-in index does not have, so it stops there instead)
    chosen = _setup(tmp_path, wheels, NORMSERVE_TORCH_SPEC="torch==2.13.0")
    assert "is the CUDA build of torch" not in chosen.stderr
    assert "setup: installing torch==2.13.0 and normserve[dev]" in chosen.stderr
