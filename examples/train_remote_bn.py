"""Train a small CNN whose batch-norm layers live on a normserve server.

Shows ``RemoteBatchNorm2d`` as a drop-in ``torch.nn.BatchNorm2d``: a real training loop (SGD with
momentum, cross-entropy) over 8x8 digit images for a few epochs, then evaluation on held-out
images. In ``train()`` mode every forward pass sends the activations to the server, which
normalizes them with the batch statistics and folds those into the session's running statistics;
in ``eval()`` mode the server normalizes with the running statistics. Gradients flow through the
remote layers exactly as through torch's. The script prints the loss per epoch, the test
accuracy and each layer's session (version, batches tracked, running statistics), and deletes
its sessions at the end.

The images are scikit-learn's ``load_digits`` when scikit-learn is installed, otherwise a
synthetic set of the same shape (10 classes of noisy, shifted 8x8 patterns); ``--data`` chooses.

Run it against a server (``scripts/serve`` in another terminal)::

    python examples/train_remote_bn.py --target 127.0.0.1:50051

The target defaults to ``$NORMSERVE_TARGET`` or 127.0.0.1:50051. ``--save model.pt`` writes the
trained model's ``state_dict`` (running statistics included, fetched from the server): a plain
torch model with ``torch.nn.BatchNorm2d`` layers loads it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
from torch import nn

from normserve.client import Client, RemoteBatchNorm2d

NormFactory = Callable[[int], nn.Module]


def load_data(kind: str, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 8, 8]`` scaled to [0, 1] and labels ``[N]``, shuffled with ``seed``."""
    if kind == "auto":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            kind = "synthetic"
        else:
            kind = "digits"
    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.int64)
    else:
        x, y = synthetic_digits(samples, seed)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:samples]
    return x[order], y[order]


def synthetic_digits(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of 8x8 patterns: a smooth random prototype per class, each sample shifted by
    up to one pixel, scaled in contrast and noised."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 1, 4, 4, generator=g)
    protos = nn.functional.interpolate(protos.view(10, 1, 4, 4), size=(8, 8), mode="bilinear")
    y = torch.randint(0, 10, (samples,), generator=g)
    x = protos[y] * (0.7 + 0.6 * torch.rand(samples, 1, 1, 1, generator=g))
    shifts = torch.randint(-1, 2, (samples, 2), generator=g)
    x = torch.stack(
        [torch.roll(img, (int(a), int(b)), (1, 2)) for img, (a, b) in zip(x, shifts, strict=True)]
    )
    x = x + 0.15 * torch.randn(x.shape, generator=g)
    return x.clamp(0, 1), y


def build_model(norm: NormFactory) -> nn.Sequential:
    """conv-norm-SiLU twice, pooled, then a linear classifier; ``norm(C)`` makes each norm."""
    # SiLU rather than ReLU: a smooth activation keeps two implementations that differ by float32
    # rounding on the same path (ReLU would amplify a rounding difference at its kink into a
    # different gradient), so this model trained locally is a twin to compare with.
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        norm(8),
        nn.SiLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        norm(16),
        nn.SiLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[str], None] = print,
) -> list[float]:
    """SGD over shuffled mini-batches; returns the mean training loss of each epoch. Batches
    keep at least two samples (batch norm needs more than one value per channel)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y), generator=g)
        total, seen = 0.0, 0
        for start in range(0, len(y) - 1, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        losses.append(total / seen)
        log(f"epoch {epoch}: loss {losses[-1]:.4f}")
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=os.environ.get("NORMSERVE_TARGET", "127.0.0.1:50051"))
    p.add_argument("--data", choices=("auto", "digits", "synthetic"), default="auto")
    p.add_argument("--samples", type=int, default=1797, help="images in all (train + test)")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="FILE", help="write the trained model's state_dict here")
    args = p.parse_args(argv)

    x, y = load_data(args.data, args.samples, args.seed)
    n_test = int(len(y) * args.test_fraction)
    x_train, y_train, x_test, y_test = x[n_test:], y[n_test:], x[:n_test], y[:n_test]
    print(f"data: {len(y_train)} training and {len(y_test)} test images of 8x8")

    with Client(args.target) as client:
        layers: list[RemoteBatchNorm2d] = []

        def remote_norm(c: int) -> nn.Module:
            layers.append(RemoteBatchNorm2d(c, client=client))
            return layers[-1]

        try:
            torch.manual_seed(args.seed)  # the same initial weights as a local twin would get
            model = build_model(remote_norm)
            print(f"sessions: {', '.join(bn.session_id for bn in layers)} on {args.target}")
            train(
                model,
                x_train,
                y_train,
                epochs=args.epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
            )
            print(f"test accuracy: {accuracy(model, x_test, y_test):.4f}")
            for bn in layers:
                s = client.get_session(bn.session_id)
                assert s.running_mean is not None and s.running_var is not None
                print(
                    f"session {s.session_id}: version {s.version}, "
                    f"num_batches_tracked {s.num_batches_tracked}, momentum {s.momentum}\n"
                    f"  running_mean[:4] {_fmt(s.running_mean[:4])}\n"
                    f"  running_var[:4]  {_fmt(s.running_var[:4])}"
                )
            if args.save:
                torch.save(model.state_dict(), args.save)
                print(f"wrote {args.save}")
        finally:
            for bn in layers:
                bn.delete_session()
            print(f"deleted {len(layers)} sessions")


def _fmt(t: torch.Tensor) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in t.tolist()) + "]"


if __name__ == "__main__":
    main()
