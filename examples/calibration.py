"""Recalibrate a batch-norm layer's running statistics on live traffic after a distribution shift.

Shows calibration with ``statistics_only=True`` TRAIN calls. A serving session holds statistics
learned on the training distribution; then the inputs shift (per channel, new offsets and scales),
and EVAL outputs are no longer centred or scaled as the model expects. The fix: a calibration
session created with ``momentum=None`` (torch's cumulative average, as ``BatchNorm2d(momentum=
None)``; the CLI's ``--cumulative``) receives calibration batches of the new traffic on one
stream with ``statistics_only=True`` (the server folds their statistics in and sends no outputs
back), and its running statistics are then imported into the serving session in one call.

The script prints the running statistics before and after, and compares them with the exact
statistics of the whole calibration set, computed locally in float64:

* with equal-size batches, the cumulative average of the batch means *is* the dataset mean;
  the running variance is the average of the batches' unbiased variances, which misses the
  spread of the batch means around the dataset mean (a small gap that shrinks with larger
  batches);
* ``--one-batch`` sends the whole calibration set as one batch (the client streams it in
  chunks, the server merges their statistics), and the running variance is then the dataset's
  unbiased variance too.

Run it against a server (``scripts/serve`` in another terminal)::

    python examples/calibration.py --target 127.0.0.1:50051 [--one-batch]

The target defaults to ``$NORMSERVE_TARGET`` or 127.0.0.1:50051. ``--save FILE`` writes the
calibration data, the batch size and the statistics before and after (``torch.load``-able).
"""

from __future__ import annotations

import argparse
import os

import torch

from normserve.client import Client


def traffic(
    n: int, channels: int, size: int, loc: torch.Tensor, scale: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    """``n`` images ``[n, C, size, size]`` with per-channel mean ``loc`` and std ``scale``."""
    x = torch.randn(n, channels, size, size, generator=g, dtype=torch.float64)
    return (x * scale.view(1, -1, 1, 1) + loc.view(1, -1, 1, 1)).float()


def eval_drift(client: Client, session_id: str, x: torch.Tensor) -> str:
    """How far EVAL outputs on ``x`` are from a unit normal per channel (what the next layer
    was trained on): the mean over channels of |mean| and of |std - 1|."""
    y = client.normalize(session_id, x, mode="eval").output
    mean = y.mean(dim=(0, 2, 3))
    std = y.std(dim=(0, 2, 3))
    return f"mean |mean| {mean.abs().mean():.3f}, mean |std - 1| {(std - 1).abs().mean():.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=os.environ.get("NORMSERVE_TARGET", "127.0.0.1:50051"))
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--size", type=int, default=8, help="image height and width")
    p.add_argument("--batch", type=int, default=64, help="images per calibration batch")
    p.add_argument("--batches", type=int, default=50, help="calibration batches")
    p.add_argument("--one-batch", action="store_true", help="send the whole set as one batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="FILE", help="write the data and the statistics here")
    args = p.parse_args(argv)
    c = args.channels

    g = torch.Generator().manual_seed(args.seed)
    loc, scale = torch.randn(c, generator=g, dtype=torch.float64), 1 + torch.rand(c, generator=g)
    # the shift: every channel moves by up to +-50 and is rescaled by 0.1 to 10
    new_loc = loc + 100 * (torch.rand(c, generator=g, dtype=torch.float64) - 0.5)
    new_scale = scale * 10 ** (2 * torch.rand(c, generator=g, dtype=torch.float64) - 1)
    calib = traffic(args.batch * args.batches, c, args.size, new_loc, new_scale, g)
    probe = traffic(256, c, args.size, new_loc, new_scale, g)  # held-out shifted traffic

    with Client(args.target) as client:
        sessions: list[str] = []
        try:
            serving = client.create_session(c, momentum=0.1).session_id
            sessions.append(serving)
            for _ in range(30):  # the statistics training left behind
                batch = traffic(args.batch, c, args.size, loc, scale, g)
                client.normalize(serving, batch, statistics_only=True)
            before = client.get_session(serving)
            assert before.running_mean is not None and before.running_var is not None
            print(f"serving session {serving}, trained on the old distribution:")
            _print_stats("before", before.running_mean, before.running_var)
            print(f"  EVAL on shifted traffic: {eval_drift(client, serving, probe)}")

            cal = client.create_session(c, momentum=None).session_id
            sessions.append(cal)
            if args.one_batch:
                batches = [calib]
                how = f"1 batch of {len(calib)} images (streamed in chunks)"
            else:
                batches = list(calib.split(args.batch))
                how = f"{len(batches)} batches of {args.batch} images on one stream"
            results = list(client.normalize_stream(cal, batches, statistics_only=True))
            assert all(r.output is None for r in results)  # statistics only: no outputs sent
            after = client.get_session(cal)
            assert after.running_mean is not None and after.running_var is not None
            print(f"calibration session {cal} (momentum=None): {how}")
            _print_stats("after", after.running_mean, after.running_var)

            data = calib.double().transpose(0, 1).reshape(c, -1)
            mean, var = data.mean(1), data.var(1)  # var: unbiased, as running_var is
            _print_stats("dataset", mean, var)
            d_mean = (after.running_mean.double() - mean).abs().max().item()
            d_var = ((after.running_var.double() - var).abs() / var).max().item()
            print(f"running_mean vs dataset mean: max |diff| {d_mean:.3g}")
            print(f"running_var vs dataset var: max relative diff {d_var:.3g}")

            stats = {
                "running_mean": after.running_mean,
                "running_var": after.running_var,
                "num_batches_tracked": torch.tensor(after.num_batches_tracked),
            }
            installed = client.import_state(serving, stats, strict=False)
            print(f"imported into the serving session (version {installed.version}):")
            print(f"  EVAL on shifted traffic: {eval_drift(client, serving, probe)}")
            if args.save:
                torch.save(
                    {
                        "calibration_data": calib,
                        "batch": len(calib) if args.one_batch else args.batch,
                        "before": {"mean": before.running_mean, "var": before.running_var},
                        "after": {"mean": after.running_mean, "var": after.running_var},
                        "num_batches_tracked": after.num_batches_tracked,
                        "serving_state": dict(client.export_state(serving)),
                    },
                    args.save,
                )
                print(f"wrote {args.save}")
        finally:
            for sid in sessions:
                client.delete_session(sid)
            print(f"deleted {len(sessions)} sessions")


def _print_stats(label: str, mean: torch.Tensor, var: torch.Tensor) -> None:
    def fmt(t: torch.Tensor) -> str:
        return "[" + ", ".join(f"{v:9.4f}" for v in t[:4].tolist()) + ", ...]"

    print(f"  {label:8s} mean[:4] {fmt(mean)}  var[:4] {fmt(var)}")


if __name__ == "__main__":
    main()
