"""Short GPU timing for scripts/gpu-check: round trips to a CUDA-backed server on loopback, and
the compute stage (what the server's metrics report) against CUDA events around the same kernels."""

from __future__ import annotations

import statistics
import time

import torch

from normserve.client import Client
from normserve.server import Settings, ops, start_server


def p50_us(fn, n: int) -> float:
    for _ in range(20):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def kernel_ms(x: torch.Tensor, reps: int = 20) -> float:
    """CUDA-event time of the TRAIN kernels alone (pivot shift, fused batch norm and update)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    w = torch.ones(x.shape[1], device=x.device)
    b = torch.zeros_like(w)
    running = (torch.zeros_like(w), torch.ones_like(w))
    for _ in range(3):
        ops.batch_norm_train(x, w, b, 1e-5, running, 0.1)
    start.record()
    for _ in range(reps):
        ops.batch_norm_train(x, w, b, 1e-5, running, 0.1)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    assert torch.cuda.is_available(), "no CUDA device"
    srv = start_server(
        Settings(address="127.0.0.1:0", metrics_address="127.0.0.1:0", device="cuda")
    )
    try:
        with Client(srv.address) as client:
            for name, shape, n in [
                ("S", (64, 256), 1000),
                ("M", (256, 1024), 300),
                ("L", (32, 64, 56, 56), 30),
            ]:
                sid = client.create_session(shape[1]).session_id
                x_cpu = torch.randn(*shape)
                x_gpu = x_cpu.cuda()
                cpu_in = p50_us(lambda s=sid, x=x_cpu: client.normalize(s, x), n)
                gpu_in = p50_us(lambda s=sid, x=x_gpu: client.normalize(s, x), n)
                print(
                    f"{name} {list(shape)} TRAIN round trip p50: {cpu_in:8.0f} us (CPU tensor in/out), "
                    f"{gpu_in:8.0f} us (CUDA tensor in/out)"
                )
                reg = srv.metrics.registry
                method = "NormalizeStream" if name == "L" else "Normalize"
                count = reg.get_sample_value(
                    "normserve_stage_duration_seconds_count", {"method": method, "stage": "compute"}
                )
                total = reg.get_sample_value(
                    "normserve_stage_duration_seconds_sum", {"method": method, "stage": "compute"}
                )
                if count and total is not None:
                    print(
                        f"   server compute stage (synchronized), mean over {int(count)} batches: "
                        f"{total / count * 1e3:.3f} ms; CUDA-event kernel time: {kernel_ms(x_gpu):.3f} ms"
                    )
                client.delete_session(sid)
        print("device memory in use:", torch.cuda.memory_allocated() / 2**20, "MiB")
    finally:
        srv.stop(0)


if __name__ == "__main__":
    main()
