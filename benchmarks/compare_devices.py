"""The GPU-backed server against the CPU-backed one, from two runs of benchmarks/run.py on the same
machine (``--device cpu --json A`` and ``--device cuda --json B``): p50 and throughput of every
normserve measurement side by side, and issue 12's server targets (the GPU server at least matches
the CPU one on every workload; L stream TRAIN >= 1.5x the CPU server's throughput at c1 and c4).

    python benchmarks/compare_devices.py CPU_JSON CUDA_JSON   # markdown on stdout
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _rows(path: str) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    with open(path) as f:
        data = json.load(f)
    out = {}
    for key, r in data["results"].items():
        if "/normserve/" not in key:
            continue
        s = r["summary"]
        out[key] = {"p50": float(s["latency_us"]["p50"]), "rps": float(s["throughput_rps"])}
    return data, out


def compare(cpu_path: str, gpu_path: str) -> str:
    cpu_data, cpu = _rows(cpu_path)
    gpu_data, gpu = _rows(gpu_path)
    lines = [
        "## GPU server against CPU server (same machine)",
        "",
        f"CPU-backed run: {cpu_data['meta']['date']}, commit {cpu_data['meta']['commit']}; "
        f"GPU-backed run: {gpu_data['meta']['date']} on {gpu_data['meta'].get('device_name')}.",
        "",
        "| measurement | CPU p50 | GPU p50 | GPU/CPU p50 | CPU req/s | GPU req/s | GPU/CPU req/s |",
        "|---|---|---|---|---|---|---|",
    ]
    worse: list[str] = []
    for key in sorted(cpu.keys() & gpu.keys()):
        c, g = cpu[key], gpu[key]
        p_ratio = g["p50"] / c["p50"] if c["p50"] else float("nan")
        r_ratio = g["rps"] / c["rps"] if c["rps"] else float("nan")
        if p_ratio > 1.0 or r_ratio < 1.0:
            worse.append(key)
        lines.append(
            f"| {key} | {c['p50']:.0f} us | {g['p50']:.0f} us | {p_ratio:.2f} "
            f"| {c['rps']:.1f} | {g['rps']:.1f} | {r_ratio:.2f} |"
        )
    lines += ["", "Targets:", ""]
    lines.append(
        f"- GPU server at least matches the CPU server in p50 and throughput on every "
        f"measurement: {'met' if not worse else 'missed on ' + ', '.join(worse)}"
    )
    for conc in (1, 4):
        key = f"L/normserve/stream/train/c{conc}"
        if key in cpu and key in gpu and cpu[key]["rps"]:
            ratio = gpu[key]["rps"] / cpu[key]["rps"]
            verdict = "met" if ratio >= 1.5 else "missed"
            lines.append(
                f"- L stream TRAIN c{conc}: GPU {ratio:.2f}x the CPU server (>= 1.5x): {verdict}"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(compare(sys.argv[1], sys.argv[2]))
