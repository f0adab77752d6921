"""RemoteSyncBatchNorm: K ranks each holding a share of the batch get the outputs, running
statistics and gradients of one torch BatchNorm over the whole batch. K = 4 real processes, and
K = 64 ranks as threads of one process, on a default server (16 workers)."""

from __future__ import annotations

import copy
import multiprocessing as mp
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from normserve.client import Client, RemoteSyncBatchNorm1d, RemoteSyncBatchNorm2d
from normserve.server import Server

C, STEPS = 3, 3


def _data(sizes: list[int], seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per step, the whole batch and the upstream gradient, [N, C, 4, 4]."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    xs = [torch.randn(n, C, 4, 4, generator=g) * 3 + 7 for _ in range(STEPS)]
    gs = [torch.randn(n, C, 4, 4, generator=g) for _ in range(STEPS)]
    return xs, gs


def _params() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([0.5, 1.5, -2.0]), torch.tensor([0.1, -0.3, 2.0])


def _reference(sizes: list[int]) -> tuple[list[dict[str, np.ndarray]], dict[str, torch.Tensor]]:
    xs, gs = _data(sizes)
    bn = torch.nn.BatchNorm2d(C)
    w, b = _params()
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    steps = []
    for x, g in zip(xs, gs, strict=True):
        x = x.clone().requires_grad_()
        bn.zero_grad()
        y = bn(x)
        (y * g).sum().backward()
        assert x.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
        steps.append(
            {
                "y": y.detach().numpy(),
                "dx": x.grad.numpy(),
                "dw": bn.weight.grad.numpy().copy(),
                "db": bn.bias.grad.numpy().copy(),
            }
        )
    return steps, bn.state_dict()


def _rank(
    target: Any, sid: str, rank: int, sizes: list[int], client: Client | None = None
) -> list[dict[str, np.ndarray]]:
    """One rank's share of every step: its slice of the batch through RemoteSyncBatchNorm2d."""
    xs, gs = _data(sizes)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    module = RemoteSyncBatchNorm2d(
        C, rank=rank, world_size=len(sizes), client=client or target, session_id=sid
    )
    w, b = _params()
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    out = []
    for x, g in zip(xs, gs, strict=True):
        x = x[lo:hi].clone().requires_grad_()
        module.zero_grad()
        y = module(x)
        (y * g[lo:hi]).sum().backward()
        assert x.grad is not None and module.weight.grad is not None
        assert module.bias.grad is not None
        out.append(
            {
                "y": y.detach().numpy(),
                "dx": x.grad.numpy(),
                "dw": module.weight.grad.numpy().copy(),
                "db": module.bias.grad.numpy().copy(),
            }
        )
    return out


def _process(target: str, sid: str, rank: int, sizes: list[int], queue: Any) -> None:
    try:
        queue.put((rank, _rank(target, sid, rank, sizes)))
    except BaseException as err:  # the parent reports it
        queue.put((rank, repr(err)))


def _compare(
    sizes: list[int], ranks: list[list[dict[str, np.ndarray]]], client: Client, sid: str
) -> dict[str, float]:
    want, state = _reference(sizes)
    # dw and db sum N * H * W float32 products: the reference's own rounding grows with the
    # batch, so they are compared relative to their size (absolute differences kept beside)
    worst = {
        "y": 0.0,
        "dx": 0.0,
        "dw": 0.0,
        "db": 0.0,
        "running": 0.0,
        "dw_abs": 0.0,
        "db_abs": 0.0,
    }
    for step, ref in enumerate(want):
        for key in ("y", "dx"):
            got = np.concatenate([r[step][key] for r in ranks])
            worst[key] = max(worst[key], float(np.abs(got - ref[key]).max()))
        for key in ("dw", "db"):  # each rank's share; DDP's all-reduce sums them
            got = np.sum([r[step][key] for r in ranks], axis=0, dtype=np.float64)
            diff = float(np.abs(got - ref[key]).max())
            worst[key + "_abs"] = max(worst[key + "_abs"], diff)
            worst[key] = max(worst[key], diff / max(1.0, float(np.abs(ref[key]).max())))
    exported = client.export_state(sid)
    for key in ("running_mean", "running_var"):
        d = float((exported[key] - state[key]).abs().max())
        worst["running"] = max(worst["running"], d)
    assert int(exported["num_batches_tracked"]) == STEPS
    return worst


def test_four_processes_equal_one_batch_norm_over_the_whole_batch(
    server: Server, client: Client
) -> None:
    sizes = [1, 2, 3, 4]  # unequal shares: Chan's merge weighs them
    sid = "sync-k4"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    t0 = time.perf_counter()
    procs = [
        ctx.Process(target=_process, args=(server.address, sid, r, sizes, queue))
        for r in range(len(sizes))
    ]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    elapsed = time.perf_counter() - t0
    for rank, result in got.items():
        assert not isinstance(result, str), f"rank {rank}: {result}"
    worst = _compare(sizes, [got[r] for r in range(len(sizes))], client, sid)
    print(
        f"\nK=4 processes, {STEPS} steps forward+backward: worst diffs "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        + f"; {elapsed:.1f} s including process start"
    )
    assert max(v for k, v in worst.items() if not k.endswith("_abs")) < 1e-5, worst


def test_sixty_four_ranks_on_a_default_server(server: Server, client: Client) -> None:
    sizes = [1 + r % 3 for r in range(64)]
    sid = "sync-k64"
    t0 = time.perf_counter()
    with ThreadPoolExecutor(64) as pool:
        ranks = list(
            pool.map(lambda r: _rank(server.address, sid, r, sizes, client), range(len(sizes)))
        )
    elapsed = time.perf_counter() - t0
    worst = _compare(sizes, ranks, client, sid)
    print(
        f"\nK=64 threads, {STEPS} steps forward+backward: worst diffs "
        + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())
        + f"; {elapsed:.2f} s ({elapsed / STEPS * 1e3:.0f} ms a step, modules created included)"
    )
    assert max(v for k, v in worst.items() if not k.endswith("_abs")) < 1e-5, worst


def test_modules_attach_check_eval_and_copies(server: Server, client: Client) -> None:
    a = RemoteSyncBatchNorm1d(C, rank=0, world_size=2, client=client, session_id="sync-m")
    b = RemoteSyncBatchNorm1d(C, rank=1, world_size=2, client=client, session_id="sync-m")
    assert client.get_session("sync-m").sync_participants == 2
    try:
        RemoteSyncBatchNorm1d(C, rank=0, world_size=3, client=client, session_id="sync-m")
        raise AssertionError("attached to a group of another size")
    except ValueError as err:
        assert "sync_participants is 2 in the session, 3 in the module" in str(err)
    x = torch.randn(4, C)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda m: m(x), (a, b)))
    assert a.sync_step == b.sync_step == 1
    a.eval()
    torch.testing.assert_close(
        a(x), torch.nn.functional.batch_norm(x, *_running(client, "sync-m"), a.weight, a.bias)
    )
    fork = copy.deepcopy(a)  # an unsynchronized copy of the statistics
    fork.train()
    assert fork(x).shape == x.shape and client.get_session(fork.session_id).sync_participants == 0
    loaded = pickle.loads(pickle.dumps(b))
    assert (loaded.rank, loaded.world_size, loaded.sync_step) == (1, 2, 1)
    assert loaded.session_id == "sync-m"


def _running(client: Client, sid: str) -> tuple[torch.Tensor, torch.Tensor]:
    state = client.export_state(sid)
    return state["running_mean"], state["running_var"]
