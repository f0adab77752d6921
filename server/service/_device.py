"""Batches to and from a CUDA device without stalling the device, or other calls, for one call.

Before (measured on the H200, issue 12): inputs went host to device from pageable memory (12.7
GB/s, and synchronous), outputs came back the same way, and every call waited with
``torch.cuda.synchronize``, which waits for every kernel of every call on the device. Now:

- each compute thread queues its kernels on a CUDA stream of its own (``own_streams``), so calls on
  different threads overlap on the device, and waiting for one call waits for that call only;
- an input is staged in pinned memory and copied to the device asynchronously (``to_device``,
  ~55 GB/s): a stream's chunk is on its way while the next one arrives;
- outputs and statistics come back into pinned memory in one batch of asynchronous copies,
  followed by one event on the call's stream (``to_host``);
- a state a call commits is complete before another thread can read it (``wait``: its own
  stream, not the device).

Pinned blocks come from torch's caching host allocator, which reuses a block only once the copies
recorded on it have completed; so nothing here keeps buffers. On the CPU every function is the
identity (or a no-op).
"""

from __future__ import annotations

import torch

__all__ = ["own_streams", "to_device", "to_host", "wait"]


def own_streams() -> None:
    """Makes a stream of this thread's own the current one on every CUDA device (the compute
    pool's initializer; nothing without CUDA). Kernels the thread queues then overlap with other
    threads' on the device, and waiting for them (``wait``) waits for this thread's only."""
    if not torch.cuda.is_available():
        return
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_stream(torch.cuda.Stream(torch.device("cuda", index)))


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` on ``device``: from host memory through a pinned staging block, asynchronously on the
    current stream (kernels queued after it on the same stream see the data)."""
    if x.device == device:
        return x
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    staged.copy_(x)
    return staged.to(device, non_blocking=True)


def wait(device: torch.device) -> None:
    """Waits until the work queued on the current stream so far has run (the CPU: nothing)."""
    if device.type == "cuda":
        event = torch.cuda.Event()
        event.record()
        event.synchronize()


def to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors in host memory (pinned, for device tensors), once their copies have arrived:
    one asynchronous copy each and one wait, for this stream only."""
    device = None
    out: list[torch.Tensor | None] = []
    for t in tensors:
        if t is None or t.device.type == "cpu":
            out.append(t)
            continue
        device = t.device
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out.append(host)
    if device is not None:
        wait(device)
    return out
