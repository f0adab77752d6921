"""The committed generated code is exactly what scripts/gen-proto produces from the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "proto" / "normserve" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="needs the dev extra (grpcio-tools)")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen-proto"), str(tmp_path)], check=True)
    fresh = tmp_path / "normserve" / "v1"
    names = sorted(p.name for p in fresh.iterdir())
    committed = sorted(p.name for p in GENERATED.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == committed
    stale = [n for n in names if (fresh / n).read_bytes() != (GENERATED / n).read_bytes()]
    assert not stale, f"stale generated code {stale}: run scripts/gen-proto and commit"
