"""benchmarks/vs_local.py runs end to end with tiny sizes and writes the fields the docs use
(no timing is asserted: the figures of a smoke run mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_vs_local_smoke(tmp_path: Path) -> None:
    js = tmp_path / "vs_local.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "vs_local.py"),
        "--sizes", "1,8", "--flat-sizes", "1,2", "--seconds", "0.05", "--turn", "0.01",
        "--concurrency", "1", "--bench-seconds", "0.3", "--json", str(js),
    ]  # fmt: skip
    try:
        import matplotlib  # noqa: F401

        cmd += ["--plot", str(tmp_path / "vs.png"), "--bench-plot", str(tmp_path / "bench.png"),
                "--bench-plot-concurrency", "1"]  # fmt: skip
        plots = True
    except ImportError:
        plots = False
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(js.read_text())
    for key in ("commit", "machine", "load_start", "load_end", "torch_threads", "chunk_bytes",
                "break_even_n_4d", "break_even_n_2d", "fit_4d", "scaling"):  # fmt: skip
        assert key in data, key
    assert data["torch_threads"] == 1
    assert [r["shape"] for r in data["rows_4d"]] == [[1, 64, 28, 28], [8, 64, 28, 28]]
    assert [r["shape"] for r in data["rows_2d"]] == [[1, 256], [2, 256]]
    # 1.5 MiB goes in chunks, 196 KiB in one message
    assert [r["streamed"] for r in data["rows_4d"]] == [False, True]
    for row in data["rows_4d"] + data["rows_2d"][1:]:
        for kind in ("local_train", "local_eval", "remote_train", "remote_eval"):
            assert row[kind]["calls"] >= 1 and row[kind]["p50_us"] > 0, (row["shape"], kind)
        assert row["ratio_train"] == row["remote_train"]["p50_us"] / row["local_train"]["p50_us"]
    # [1, 256] has one value per channel: TRAIN is refused by torch and normserve alike
    flat1 = data["rows_2d"][0]
    assert flat1["local_train"] is None and flat1["remote_train"] is None
    assert flat1["remote_eval"]["calls"] >= 1
    assert data["fit_4d"]["remote_train"]["per_mib_us"] is not None
    assert {(r["concurrency"], r["mode"]) for r in data["scaling"]} == {(1, "train"), (1, "eval")}
    for r in data["scaling"]:
        assert r["requests"] > 0 and r["errors"] == 0 and r["p99_us"] >= r["p50_us"] > 0
        assert r["command"].startswith("normserve bench ")
    assert "TRAIN ratio" in proc.stdout and "normserve bench, closed loop" in proc.stdout
    if plots:
        assert (tmp_path / "vs.png").stat().st_size > 0
        assert (tmp_path / "bench.png").stat().st_size > 0
