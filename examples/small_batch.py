"""Batch size 2 per device over 4 devices: local batch norm against pooled statistics, group norm
and batch renorm.

A small CNN learns scikit-learn's 8x8 digits (shipped with scikit-learn: no download) data
parallel over 4 processes on the CPU (``torch.distributed`` with gloo on 127.0.0.1, gradients
averaged by ``DistributedDataParallel``), each process a device with its own shard of the training
images and a batch of 2 per step (8 in all). The same network, initial weights, data order,
optimizer and steps are trained four times, once per normalization:

- ``local-bn``: ``torch.nn.BatchNorm2d``: each device normalizes with the statistics of its own 2
  images, and the running statistics (what eval mode uses) are those of rank 0's batches of 2;
- ``pooled-bn``: ``RemoteSyncBatchNorm2d``: normserve pools the 4 devices' statistics, so every
  step is one batch norm over all 8 images (outputs, running statistics and gradients);
- ``group-norm``: ``torch.nn.GroupNorm``: statistics per image, no batch dependence at all;
- ``batch-renorm``: ``RemoteBatchRenorm2d`` (Ioffe 2017): batch statistics corrected towards the
  running ones, which live in one server session per layer that the 4 devices share.

Every ``--eval-every`` steps rank 0 measures the test accuracy in eval mode (running statistics)
on held-out images. The script prints the final accuracies as a table and draws the four curves
into one PNG (``--out``, default docs/img/small_batch.png; needs matplotlib). It deletes the
sessions it created.

Run it against a server (``scripts/serve`` in another terminal)::

    python examples/small_batch.py --target 127.0.0.1:50051

The target defaults to ``$NORMSERVE_TARGET``; with neither, the script starts a server of its own
in this process on a free loopback port. Needs scikit-learn and matplotlib
(``pip install 'normserve[examples]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from normserve.client import Client, RemoteBatchRenorm2d, RemoteSyncBatchNorm2d

VARIANTS = ("local-bn", "pooled-bn", "group-norm", "batch-renorm")
LABELS = {
    "local-bn": "local BatchNorm2d (statistics of 2 images)",
    "pooled-bn": "RemoteSyncBatchNorm2d (normserve pools 4 x 2)",
    "group-norm": "GroupNorm (4 groups)",
    "batch-renorm": "RemoteBatchRenorm2d (shared session)",
}
ROOT = Path(__file__).resolve().parents[1]
NormFactory = Callable[[int], nn.Module]
#: an evaluation: (step, test accuracy, test loss)
Point = tuple[int, float, float]


def load_data(
    seed: int, test_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``[N, 1, 8, 8]`` in [0, 1], shuffled with ``seed``, split into
    training images and labels, then test images and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    n_test = int(len(y) * test_fraction)
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def batch_indices(
    n_train: int, world: int, rank: int, per_device: int, steps: int, seed: int
) -> torch.Tensor:
    """``[steps, per_device]`` indices into the training set for ``rank``: its shard is every
    ``world``-th image from ``rank`` on, drawn without replacement, reshuffled each pass."""
    shard = torch.arange(rank, n_train, world)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    per_pass = len(shard) // per_device * per_device
    passes = -(-steps * per_device // per_pass)
    drawn = torch.cat(
        [shard[torch.randperm(len(shard), generator=g)[:per_pass]] for _ in range(passes)]
    )
    return drawn[: steps * per_device].view(steps, per_device)


def build_model(norm: NormFactory) -> nn.Sequential:
    """Three conv-norm-SiLU blocks at 8x8, 4x4 and 2x2 (16, 32, 64 channels), averaged, then a
    linear classifier; ``norm(C)`` makes each normalization layer. With 2 images per device the
    three norms see 128, 32 and 8 values per channel in a batch."""
    # Smooth activation and average pooling: no kinks where float32 rounding could flip a path, so
    # the pooled run stays a twin of one process normalizing all 8 images (tests compare them).
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),
        norm(16),
        nn.SiLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),
        norm(32),
        nn.SiLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False),
        norm(64),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy in eval mode (running statistics); leaves the model in
    train mode."""
    model.eval()
    try:
        logits = model(x)
        accuracy = (logits.argmax(1) == y).float().mean().item()
        return accuracy, nn.functional.cross_entropy(logits, y).item()
    finally:
        model.train()


def norm_factory(
    variant: str, *, client: Client | None, run: str, rank: int, world: int, steps: int
) -> tuple[NormFactory, list[nn.Module]]:
    """The norm layers of ``variant`` for ``rank``, and the list the remote ones are added to."""
    remote: list[nn.Module] = []
    if variant == "local-bn":
        return nn.BatchNorm2d, remote
    if variant == "group-norm":
        return lambda c: nn.GroupNorm(4, c), remote
    assert client is not None

    def layer_id() -> str:
        # the same on every rank, so the ranks meet in one session per layer
        return f"small-batch-{run}-{variant}-{len(remote)}"

    if variant == "pooled-bn":

        def make(c: int) -> nn.Module:
            m = RemoteSyncBatchNorm2d(
                c, rank=rank, world_size=world, client=client, session_id=layer_id(),
                ttl_seconds=3600,
            )  # fmt: skip
            remote.append(m)
            return m

        return make, remote
    if variant == "batch-renorm":
        # One session per layer for all 4 devices, not one each: eval mode uses the running
        # statistics, and batch renorm corrects every batch towards them, so they should see all
        # the data (4 batches of 2 per step) rather than one device's quarter. The sessions are
        # not synchronized: each device's TRAIN call is one update, in arrival order, so the
        # momentum is lowered to 1 - 0.9 ** (1 / 4) to keep the averaging horizon of momentum 0.1
        # at one update per step (docs/modules.md, "Under DistributedDataParallel").
        momentum = 1 - 0.9 ** (1 / world)
        # r and d start at 1 and 0 (plain batch norm) while the running statistics settle, and
        # widen to rmax 3 and dmax 5 over the first quarter of the run (counted in TRAIN batches:
        # world of them per step).
        warmup = world * max(1, steps // 4)

        def make(c: int) -> nn.Module:
            m = RemoteBatchRenorm2d(
                c, momentum=momentum, rmax=3.0, dmax=5.0, rmax_warmup_steps=warmup,
                dmax_warmup_steps=warmup, client=client, session_id=layer_id(), ttl_seconds=3600,
            )  # fmt: skip
            remote.append(m)
            return m

        return make, remote
    raise ValueError(f"unknown variant {variant!r}")


def train_variant(
    variant: str,
    rank: int,
    world: int,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    client: Client | None,
    run: str,
) -> list[Point]:
    """One run of ``variant`` on this rank; rank 0 returns its evaluations."""
    x_train, y_train, x_test, y_test = data
    make, remote = norm_factory(
        variant, client=client, run=run, rank=rank, world=world, steps=args.steps
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every variant
    model = build_model(make)
    ddp = DistributedDataParallel(model)  # broadcasts rank 0's parameters, averages gradients
    opt = optimizer(model, args.lr)
    batches = batch_indices(len(y_train), world, rank, args.batch, args.steps, args.seed)
    curve: list[Point] = []
    try:
        for step in range(args.steps + 1):
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
                curve.append((step, *evaluate(model, x_test, y_test)))
            if step == args.steps:
                break
            idx = batches[step]
            loss = nn.functional.cross_entropy(ddp(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        dist.barrier()  # every rank done with the sessions
    finally:
        if rank == 0:
            for m in remote:
                m.delete_session()  # type: ignore[operator]
    return curve


def worker(
    rank: int,
    world: int,
    store_port: int,
    target: str | None,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    run: str,
    results: Any,
) -> None:
    torch.set_num_threads(1)  # tiny kernels, and 4 processes on a few cores
    store = dist.TCPStore("127.0.0.1", store_port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    # the call timeout above the synchronized sessions' 30 s, as docs/modules.md asks
    client = Client(target, timeout=60) if target else None
    try:
        for variant in args.variants:
            t0 = time.perf_counter()
            curve = train_variant(variant, rank, world, data, args, client, run)
            if rank == 0:
                results.put((variant, curve, time.perf_counter() - t0))
    finally:
        if client is not None:
            client.close()
        dist.destroy_process_group()


def plot(
    curves: dict[str, list[Point]], quarter: dict[str, float], args: argparse.Namespace, out: Path
) -> None:
    """Test accuracy against steps (legend: final and last-quarter accuracy), and below it the
    test loss, whose spikes show an eval mode that disagrees with training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_loss) = plt.subplots(
        2, 1, figsize=(7.5, 6.5), dpi=120, sharex=True, gridspec_kw={"height_ratios": [2, 1]}
    )
    for variant, curve in curves.items():
        steps, accs, losses = zip(*curve, strict=True)
        label = f"{LABELS[variant]}: {accs[-1]:.3f} (last quarter {quarter[variant]:.3f})"
        ax.plot(steps, accs, marker=".", label=label)
        ax_loss.plot(steps, losses, marker=".")
    ax.set_title(
        f"Digits: batch {args.batch} per device \u00d7 {args.devices} devices "
        f"({args.batch * args.devices} images a step), SGD lr {args.lr}"
    )
    ax.set_ylabel("test accuracy (eval mode)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("test loss (eval mode)")
    ax_loss.set_xlabel("training step")
    ax_loss.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--target",
        default=os.environ.get("NORMSERVE_TARGET") or None,
        help="host:port of a normserve server (default: $NORMSERVE_TARGET, else one started here)",
    )
    p.add_argument("--steps", type=int, default=600, help="training steps of each variant")
    p.add_argument("--eval-every", type=int, default=25, help="steps between test evaluations")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "small_batch.png")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated, of {', '.join(VARIANTS)}",
    )
    p.add_argument("--devices", type=int, default=4, help="processes (simulated devices)")
    p.add_argument("--batch", type=int, default=2, help="images per device per step")
    p.add_argument("--lr", type=float, default=0.02, help="SGD (momentum 0.9) learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the curves here")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown or not args.variants:
        p.error(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose of {VARIANTS}")
    if args.steps < 1 or args.eval_every < 1 or args.devices < 2 or args.batch < 1:
        p.error("--steps, --eval-every and --batch must be >= 1, --devices >= 2")

    torch.set_num_threads(1)
    data = load_data(args.seed, args.test_fraction)
    print(
        f"data: {len(data[1])} training and {len(data[3])} test images of 8x8; "
        f"{args.devices} devices x batch {args.batch}, {args.steps} steps"
    )
    server = None
    target = args.target
    if target is None and any(v in ("pooled-bn", "batch-renorm") for v in args.variants):
        from normserve.server import Settings, start_server

        server = start_server(Settings(address="127.0.0.1:0", metrics_address="off", device="cpu"))
        target = server.address
        print(f"started a normserve server on {target}")
    # the rendezvous of the process group, on a port the OS picked (no free-port race)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    results = mp.get_context("spawn").SimpleQueue()
    t0 = time.perf_counter()
    try:
        mp.spawn(
            worker,
            args=(args.devices, store.port, target, data, args, uuid.uuid4().hex[:8], results),
            nprocs=args.devices,
        )
    finally:
        if server is not None:
            server.stop(0)
    elapsed = time.perf_counter() - t0
    curves: dict[str, list[Point]] = {}
    seconds: dict[str, float] = {}
    while not results.empty():
        variant, curve, secs = results.get()
        curves[variant], seconds[variant] = curve, secs

    tail = args.steps - args.steps // 4
    print(
        f"\ntest accuracy in eval mode; 'last quarter': the mean of the evaluations at steps >= {tail}"
    )
    print(f"{'variant':<14}{'normalization':<48}{'final':>7}{'last quarter':>14}{'seconds':>9}")
    finals = {v: c[-1][1] for v, c in curves.items()}
    quarter = {v: _mean([a for s, a, _ in c if s >= tail]) for v, c in curves.items()}
    for v in args.variants:
        print(f"{v:<14}{LABELS[v]:<48}{finals[v]:>7.4f}{quarter[v]:>14.4f}{seconds[v]:>9.1f}")
    print(f"total {elapsed:.1f} s")
    plot(curves, quarter, args, args.out)
    print(f"wrote {args.out}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": {
                        "devices": args.devices,
                        "batch_per_device": args.batch,
                        "steps": args.steps,
                        "eval_every": args.eval_every,
                        "lr": args.lr,
                        "seed": args.seed,
                    },
                    "curves": {
                        v: [{"step": s, "accuracy": a, "loss": loss} for s, a, loss in c]
                        for v, c in curves.items()
                    },
                    "final_accuracy": finals,
                    "last_quarter_accuracy": quarter,
                    "seconds": seconds,
                    "total_seconds": elapsed,
                },
                indent=2,
            )
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
