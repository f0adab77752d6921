"""Serve batch-norm inference (EVAL) from a session imported from a torch state_dict.

Shows the serving path: a ``torch.nn.BatchNorm2d`` trained locally is moved into a server session
with ``import_state`` (its ``state_dict`` as is: weight, bias, running statistics), then several
concurrent clients send EVAL calls, from threads sharing one ``Client`` (the default) or as
asyncio tasks on one ``AsyncClient`` (``--asyncio``). EVAL normalizes with the running statistics
and never changes the session: the script checks that the session's version and state are the
same after all the calls, checks every output against the local module in eval mode, and prints
the latency percentiles and throughput the clients saw.

Run it against a server (``scripts/serve`` in another terminal)::

    python examples/eval_serving.py --target 127.0.0.1:50051 [--clients 8] [--asyncio]

The target defaults to ``$NORMSERVE_TARGET`` or 127.0.0.1:50051. ``--save FILE`` writes the
imported state, the first 100 calls' inputs and outputs and the session's versions
(``torch.load``-able).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from normserve.client import AsyncClient, Client

Call = tuple[torch.Tensor, torch.Tensor, float]  # input, output, seconds
SAVED_CALLS = 100  # --save keeps this many calls' tensors (all of them would be large)


def trained_bn(channels: int, seed: int) -> tuple[nn.BatchNorm2d, torch.Tensor, torch.Tensor]:
    """A BatchNorm2d with non-trivial state, as if trained: per-channel data statistics folded
    into its running statistics over a few batches, and a learned-looking weight and bias. Also
    returns the per-channel mean and scale of its data, for making inputs like it."""
    g = torch.Generator().manual_seed(seed)
    loc = 3.0 * torch.randn(channels, generator=g)
    scale = 0.5 + 2.0 * torch.rand(channels, generator=g)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.copy_(1.0 + 0.2 * torch.randn(channels, generator=g))
        bn.bias.copy_(0.1 * torch.randn(channels, generator=g))
    bn.train()
    for _ in range(20):
        bn(sample(16, channels, 8, loc, scale, g))
    return bn.eval(), loc, scale


def sample(
    n: int, channels: int, size: int, loc: torch.Tensor, scale: torch.Tensor, g: torch.Generator
) -> torch.Tensor:
    x = torch.randn(n, channels, size, size, generator=g)
    return x * scale.view(1, -1, 1, 1) + loc.view(1, -1, 1, 1)


def inputs_for(
    client_no: int, args: argparse.Namespace, loc: torch.Tensor, scale: torch.Tensor
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed + 1 + client_no)
    return [
        sample(args.batch, args.channels, args.size, loc, scale, g) for _ in range(args.requests)
    ]


def serve_threads(target: str, session_id: str, batches: list[list[torch.Tensor]]) -> list[Call]:
    """One Client shared by a thread per simulated caller (gRPC channels are thread-safe)."""
    calls: list[Call] = []
    lock = threading.Lock()
    with Client(target) as client:

        def caller(mine: list[torch.Tensor]) -> None:
            for x in mine:
                t0 = time.perf_counter()
                y = client.normalize(session_id, x, mode="eval").output
                dt = time.perf_counter() - t0
                with lock:
                    calls.append((x, y, dt))

        with ThreadPoolExecutor(len(batches)) as pool:
            for f in [pool.submit(caller, mine) for mine in batches]:
                f.result()  # re-raises a caller's error
    return calls


async def serve_asyncio(
    target: str, session_id: str, batches: list[list[torch.Tensor]]
) -> list[Call]:
    """One AsyncClient, a task per simulated caller, all on one event loop."""
    calls: list[Call] = []
    async with AsyncClient(target) as client:

        async def caller(mine: list[torch.Tensor]) -> None:
            for x in mine:
                t0 = time.perf_counter()
                y = (await client.normalize(session_id, x, mode="eval")).output
                calls.append((x, y, time.perf_counter() - t0))

        await asyncio.gather(*(caller(mine) for mine in batches))
    return calls


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)
    cuts = statistics.quantiles(ms, n=1000, method="inclusive") if len(ms) > 1 else ms * 999
    return {"p50": cuts[499], "p90": cuts[899], "p99": cuts[989], "max": ms[-1]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default=os.environ.get("NORMSERVE_TARGET", "127.0.0.1:50051"))
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="images per call")
    p.add_argument("--size", type=int, default=8, help="image height and width")
    p.add_argument("--clients", type=int, default=8, help="concurrent callers")
    p.add_argument("--requests", type=int, default=100, help="calls per caller")
    p.add_argument("--asyncio", action="store_true", help="AsyncClient tasks instead of threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", metavar="FILE", help="write the state, versions, first calls' tensors")
    args = p.parse_args(argv)

    bn, loc, scale = trained_bn(args.channels, args.seed)
    batches = [inputs_for(i, args, loc, scale) for i in range(args.clients)]

    with Client(args.target) as client:
        session = client.create_session(args.channels)
        sid = session.session_id
        try:
            client.import_state(sid, bn.state_dict())
            before = client.get_session(sid)
            print(f"session {sid}: imported a BatchNorm2d({args.channels}) state_dict")
            print(f"  version {before.version}, num_batches_tracked {before.num_batches_tracked}")

            how = "asyncio tasks" if args.asyncio else "threads"
            print(f"serving {args.clients} {how} x {args.requests} EVAL calls of {_shape(args)}")
            t0 = time.perf_counter()
            if args.asyncio:
                calls = asyncio.run(serve_asyncio(args.target, sid, batches))
            else:
                calls = serve_threads(args.target, sid, batches)
            wall = time.perf_counter() - t0

            after = client.get_session(sid)
            state_after = client.export_state(sid)
            same_state = all(torch.equal(v, state_after[k]) for k, v in bn.state_dict().items())
            print(
                f"  version {after.version}, num_batches_tracked {after.num_batches_tracked} "
                f"after: {'unchanged' if after.version == before.version else 'CHANGED'}, "
                f"state {'unchanged' if same_state else 'CHANGED'}"
            )
            with torch.no_grad():
                err = max((y - bn(x)).abs().max().item() for x, y, _ in calls)
            print(f"max |output - torch BatchNorm2d.eval()| = {err:.3g}")
            pct = percentiles_ms([dt for _, _, dt in calls])
            print(
                f"latency ms: p50 {pct['p50']:.3f}  p90 {pct['p90']:.3f}  "
                f"p99 {pct['p99']:.3f}  max {pct['max']:.3f}"
            )
            print(f"throughput: {len(calls) / wall:.0f} calls/s over {wall:.2f} s")
            if args.save:
                torch.save(
                    {
                        "state_dict": bn.state_dict(),
                        "inputs": [x for x, _, _ in calls[:SAVED_CALLS]],
                        "outputs": [y for _, y, _ in calls[:SAVED_CALLS]],
                        "version_before": before.version,
                        "version_after": after.version,
                        "state_after": dict(state_after),
                    },
                    args.save,
                )
                print(f"wrote {args.save}")
        finally:
            client.delete_session(sid)
            print(f"deleted session {sid}")


def _shape(args: argparse.Namespace) -> str:
    return f"[{args.batch}, {args.channels}, {args.size}, {args.size}]"


if __name__ == "__main__":
    main()
