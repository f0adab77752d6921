"""benchmarks/parity.py runs end to end with one round per kind: every kind is in its table and its
JSON, and every float32 difference from torch is within 1e-4 (the README promises 1e-5; the
margin keeps a round's draw from deciding), with the instrument shown to see float32 rounding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = [
    "batch_norm1d", "batch_norm2d", "batch_norm3d", "layer_norm", "group_norm", "instance_norm",
    "rms_norm", "batch_renorm", "ghost_batch_norm", "recurrent_batch_norm",
]  # fmt: skip
HALF = {"batch_norm float16": 1e-2, "batch_norm bfloat16": 5e-2}  # outputs' relative difference
FLOAT32_PAIRS = ("normserve vs torch float64", "normserve vs torch float32")


def test_parity_one_round(tmp_path: Path) -> None:
    js, md = tmp_path / "parity.json", tmp_path / "parity.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "parity.py"), "--rounds", "1",
           "--json", str(js), "--out", str(md)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(js.read_text())
    rows = {k["kind"]: k for k in data["kinds"]}
    assert list(rows) == [*KINDS, *HALF]
    for name in rows:
        assert f"| {name} | 1 |" in proc.stdout, name
    for name in KINDS:
        row = rows[name]
        assert (row["rounds"], row["count_mismatches"]) == (1, 0), name
        assert row["calls"] >= 3 and len(row["configs"]) == 1, name
        for pair in FLOAT32_PAIRS:
            worst = row["worst"][pair]
            assert {"output", "input_grad"} <= worst.keys(), (name, pair)
            for quantity, w in worst.items():
                assert w["values"] > 0, (name, pair, quantity)
                assert w["abs"] <= 1e-4 and w["rel"] <= 1e-4, (name, pair, quantity, w)
        # a comparison that looked at one tensor twice would read 0: float32 rounding must show
        assert row["worst"]["torch float32 vs torch float64"]["output"]["abs"] > 0, name
    for name, bound in HALF.items():
        row = rows[name]
        assert row["dtype"] in name and row["count_mismatches"] == 0
        out = row["worst"]["normserve vs torch half"]["output"]
        assert out["values"] > 0 and 0 < out["rel"] <= bound, (name, out)
    doc = md.read_text()
    assert doc.startswith("# Parity with torch")
    for field in (
        "- Date: ",
        "- Machine: ",
        "- Commit: ",
        "- Command: `python benchmarks/parity.py",
    ):
        assert field in doc, field
    assert all(f"| {name} |" in doc for name in rows)
