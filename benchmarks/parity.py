"""How closely every session kind matches torch: outputs, running statistics and gradients.

    python benchmarks/parity.py [--rounds 20] [--seed 0] [--device cpu] [--json FILE]
                                [--out docs/parity.md]

Starts a real server in this process (port 0 of 127.0.0.1), then for each kind runs --rounds
rounds, each a config (the kind's options cycled through, so that --rounds at least as large as
their number meets every one) and random shapes, seeded: several TRAIN calls, then EVAL calls,
through the client's torch module (RemoteBatchNorm2d, RemoteLayerNorm, ...) under autograd, each
call's output backpropagated with a random gradient. The same calls go to torch's module (or, for
batch renorm, ghost and recurrent batch norm, which torch lacks, a reference written from the
kind's definition in _parity_kinds.py) in float64, the reference, and in float32, torch's own
float32 result; each starts with the same random weight and bias. The inputs are float32 (all three
see the same values), with at least 8 values behind every mean and variance.

Compared after every call: the output, the input's gradient and the weight's and bias's; after each
round: running_mean and running_var (and num_batches_tracked, which must be equal). For each kind it
reports the worst absolute difference, max |a - b|, and the worst relative one, max |a - b| /
max |b| over a tensor (relative to the tensor's scale, so that values near 0 do not turn rounding
into large ratios), over all rounds, with the number of values compared; for normserve against
float64, normserve against torch float32, and torch float32 against float64 (what float32 itself
costs). Batch norm's float16 and bfloat16 rows compare outputs and running statistics with torch's
own half computation (float32 parameters and statistics, as normserve's).

Prints markdown tables; --json FILE writes every figure with the configs, the machine and the
versions; --out FILE writes the tables with the date, machine, commit and command (docs/parity.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _parity_kinds import HALF_KINDS, KINDS, Case, Kind, running_stats  # beside this script
from torch import Tensor

from normserve.client import Client
from normserve.client.bench import git_commit, machine_info
from normserve.server import Settings, start_server

ROOT = Path(__file__).resolve().parents[1]
QUANTITIES = ("output", "running_mean", "running_var", "input_grad", "weight_grad", "bias_grad")
HEADERS = ("output", "running mean", "running var", "input grad", "weight grad", "bias grad")
#: (compared, reference) pairs, by the name the report gives them
PAIRS = {
    "normserve vs torch float64": ("normserve", "float64"),
    "normserve vs torch float32": ("normserve", "float32"),
    "torch float32 vs torch float64": ("float32", "float64"),
}
HALF_PAIRS = {
    "normserve vs torch half": ("normserve", "float32"),
    "normserve vs float64": ("normserve", "float64"),
    "torch half vs float64": ("float32", "float64"),
}


@dataclass
class Worst:
    """The worst differences met so far for one quantity, and how many values were compared."""

    abs: float = 0.0
    rel: float = 0.0
    values: int = 0

    def add(self, got: Tensor, ref: Tensor) -> None:
        if got.shape != ref.shape:
            raise AssertionError(f"shapes differ: {tuple(got.shape)} and {tuple(ref.shape)}")
        diff = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
        scale = ref.double().abs().max().item() if ref.numel() else 0.0
        self.abs = max(self.abs, diff)
        self.rel = max(self.rel, diff / scale if scale else (0.0 if diff == 0 else float("inf")))
        self.values += got.numel()


@dataclass
class KindResult:
    name: str
    dtype: str
    rounds: int = 0
    calls: int = 0
    seconds: float = 0.0
    #: num_batches_tracked differing from the reference's, rounds
    count_mismatches: int = 0
    worst: dict[str, dict[str, Worst]] = field(default_factory=dict)
    configs: list[dict[str, Any]] = field(default_factory=list)

    def record(self, pairs: dict[str, tuple[str, str]], quantity: str, got: dict[str, Tensor]):
        for label, (a, b) in pairs.items():
            self.worst.setdefault(label, {q: Worst() for q in QUANTITIES})[quantity].add(
                got[a], got[b]
            )


def _grads(module: torch.nn.Module) -> dict[str, Tensor]:
    out = {f"{name}_grad": p.grad for name, p in module.named_parameters() if p.grad is not None}
    for p in module.parameters():
        p.grad = None
    return out


def run_case(case: Case, kind: Kind, gen: torch.Generator, result: KindResult) -> None:
    """One round: the same calls to the remote module and to torch's in float64 and float32."""
    half = kind.dtype != torch.float32
    pairs = HALF_PAIRS if half else PAIRS
    modules = {
        "normserve": case.remote,
        "float64": case.reference(torch.float64),
        "float32": case.reference(torch.float32),
    }
    params = dict(case.remote.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5 if name == "weight" else
                    torch.randn(p.shape, generator=gen))  # fmt: skip
        for who in ("float64", "float32"):
            theirs = dict(modules[who].named_parameters())
            assert theirs.keys() == params.keys(), (who, list(theirs), list(params))
            for name, q in theirs.items():
                q.copy_(params[name])
    for step in case.steps:
        scale, offset = 0.5 + 2.5 * torch.rand(1, generator=gen), 6 * torch.rand(1, generator=gen)
        x = (torch.randn(step.shape, generator=gen) * scale + offset - 3).to(kind.dtype)
        seen: dict[str, dict[str, Tensor]] = {}
        dy: Tensor | None = None
        for who, module in modules.items():
            module.train(step.train)
            xi = x.double() if who == "float64" else x.clone()
            if half:
                with torch.no_grad():
                    seen[who] = {"output": module(xi, *step.args)}
                continue
            xi.requires_grad_()
            y = module(xi, *step.args)
            if dy is None:
                dy = torch.randn(y.shape, generator=gen)
            y.backward(dy.to(y.dtype))
            assert xi.grad is not None
            seen[who] = {"output": y.detach(), "input_grad": xi.grad, **_grads(module)}
        for quantity in seen["normserve"]:
            result.record(pairs, quantity, {who: got[quantity] for who, got in seen.items()})
        result.calls += 1
    stats = {who: running_stats(m) for who, m in modules.items()}
    for quantity in ("running_mean", "running_var"):
        if quantity in stats["float64"]:
            result.record(pairs, quantity, {who: s[quantity] for who, s in stats.items()})
    counts = {int(s["num_batches_tracked"]) for s in stats.values() if "num_batches_tracked" in s}
    result.count_mismatches += len(counts) > 1


def run_kind(kind: Kind, rounds: int, seed: int, client: Client) -> KindResult:
    result = KindResult(kind.name, str(kind.dtype).removeprefix("torch."))
    rng = random.Random(f"{seed}:{kind.name}")
    gen = torch.Generator().manual_seed(rng.getrandbits(63))
    combos = list(kind.combos)
    rng.shuffle(combos)
    start = time.perf_counter()
    for i in range(rounds):
        case = kind.build(rng, combos[i % len(combos)], client)
        result.configs.append(case.config)
        try:
            run_case(case, kind, gen, result)
        finally:
            case.remote.delete_session()  # type: ignore[operator]
        result.rounds += 1
    result.seconds = time.perf_counter() - start
    return result


# ---- the report


def _cell(w: Worst) -> str:
    return f"{w.abs:.1e} / {w.rel:.1e}" if w.values else "-"


def table(results: list[KindResult], label: str, quantities: tuple[str, ...]) -> str:
    heads = [HEADERS[QUANTITIES.index(q)] for q in quantities]
    lines = [
        f"| kind | rounds | calls | values | {' | '.join(heads)} |",
        "| --- | ---: | ---: | ---: |" + " --- |" * len(quantities),
    ]
    for r in results:
        worst = r.worst[label]
        values = sum(worst[q].values for q in quantities)
        cells = " | ".join(_cell(worst[q]) for q in quantities)
        lines.append(f"| {r.name} | {r.rounds} | {r.calls} | {values:,} | {cells} |")
    return "\n".join(lines)


def report(results: list[KindResult], halves: list[KindResult]) -> str:
    parts = []
    for label in PAIRS:
        parts += [f"**{label}** (worst absolute / relative difference)", "",
                  table(results, label, QUANTITIES), ""]  # fmt: skip
    parts += ["**batch norm on half inputs**: outputs (worst absolute / relative difference), "
              "running statistics", ""]  # fmt: skip
    heads = [*HALF_PAIRS, "running mean; var vs torch"]
    parts += [f"| kind | rounds | values | {' | '.join(heads)} |",
              "| --- | ---: | ---: |" + " --- |" * len(heads)]  # fmt: skip
    for r in halves:
        cells = [_cell(r.worst[label]["output"]) for label in HALF_PAIRS]
        w = r.worst["normserve vs torch half"]
        cells.append(f"{_cell(w['running_mean'])}; {_cell(w['running_var'])}")
        parts.append(f"| {r.name} | {r.rounds} | {w['output'].values:,} | {' | '.join(cells)} |")
    mismatched = [r.name for r in [*results, *halves] if r.count_mismatches]
    parts += ["", "num_batches_tracked: " + (
        "equal to the reference's in every round" if not mismatched
        else "DIFFERS in " + ", ".join(mismatched))]  # fmt: skip
    return "\n".join(parts)


DOC = """# Parity with torch

How closely each session kind matches torch, measured by `benchmarks/parity.py` (this file is its
`--out`; rerun it to refresh every number here). For each kind, {rounds} rounds of random
configs and shapes (seed {seed}; a kind's options are cycled, so 20 rounds meet every combination
of them): several TRAIN calls, then EVAL calls, through the client's torch module
(`RemoteBatchNorm2d`, `RemoteLayerNorm`, ...) under autograd, each output backpropagated with a
random gradient; the same calls go to torch's module in float64 (the reference) and in float32.
Batch renorm, ghost and recurrent batch norm, which torch lacks, are compared with references
written from their definitions (Ioffe 2017 with r and d held constant in the backward; a loop of
`F.batch_norm` over `input.split(G)`; T `BatchNorm1d` sharing one weight and bias), in
`benchmarks/_parity_kinds.py`. Inputs are float32 (half in the last table), every mean and
variance over at least 8 values.

Each cell is the worst absolute difference, max |a - b|, and the worst relative one, max |a - b| /
max |b| over the tensor, over all rounds; "values" counts the numbers compared. "-": the kind has
no such quantity in any round drawn (no running statistics, no weight or bias).

Reading the tables:

- The second table is normserve against torch's own float32 result, the third torch float32
  against float64: where normserve's differences from float64 are of the size of the third
  table's, it is as close to the exact result as torch is. A 0 in the second table means the same
  float32 value to the bit.
- Weight and bias gradients are sums over every value of a channel (or position), so their
  absolute differences grow with the batch; read their relative column. Running means near 0,
  and weight gradients that are small sums of large terms (cancellation), have relative
  differences above float32's 6e-8 in torch's own float32 result too.
- RMS norm with `eps=None` uses the machine epsilon of the computation, float64's in the float64
  reference and float32's in normserve and torch float32 (a difference of about 6e-8 relative).
- Half inputs: torch computes in float32 and rounds the output once. A remote module gets x_hat
  back from the server in the input's dtype and applies weight and bias after it, in float32, so
  with affine parameters its output is rounded twice: it can be off by half a unit in the last
  place of x_hat * weight more than torch's, which shows in absolute terms where an output is
  small next to those terms. The running statistics are float32 in both and agree to float32.

- Date: {date}
- Machine: {machine}
- Commit: {commit}
- Command: `{command}`
- Server device: {device}; took {seconds:.0f} s

{tables}
"""


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu_model']} ({info['cpu_count']} cores), {info['platform']}, "
        f"Python {info['python']}, torch {info['torch']}, normserve {info['normserve']}; "
        f"load average {', '.join(map(str, info['loadavg']))} at the end (a shared machine)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds per kind (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="the server's device (default cpu)")
    parser.add_argument("--kinds", default="", help="comma-separated kinds (default: all)")
    parser.add_argument("--json", metavar="FILE", help="write every figure as JSON")
    parser.add_argument("--out", metavar="FILE", help="write the tables as markdown (docs)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    wanted = {k for k in args.kinds.split(",") if k}
    kinds = [k for k in KINDS if not wanted or k.name in wanted]
    halves = [k for k in HALF_KINDS if not wanted or k.name in wanted]
    start = time.perf_counter()
    server = start_server(
        Settings(address="127.0.0.1:0", metrics_address="off", device=args.device)
    )
    try:
        with Client(server.address, timeout=60) as client:
            results = [run_kind(k, args.rounds, args.seed, client) for k in kinds]
            half_results = [run_kind(k, args.rounds, args.seed, client) for k in halves]
    finally:
        server.stop(0)
    seconds = time.perf_counter() - start
    text = report(results, half_results)
    print(text)
    print(f"\n{seconds:.1f} s", file=sys.stderr)
    info = machine_info()
    command = " ".join(
        ["python benchmarks/parity.py", *(argv if argv is not None else sys.argv[1:])]
    )
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.json:
        data = {
            "date": date,
            "command": command,
            "commit": git_commit(ROOT),
            "machine": info,
            "device": args.device,
            "rounds": args.rounds,
            "seed": args.seed,
            "seconds": seconds,
            "kinds": [
                {
                    "kind": r.name,
                    "dtype": r.dtype,
                    "rounds": r.rounds,
                    "calls": r.calls,
                    "seconds": r.seconds,
                    "count_mismatches": r.count_mismatches,
                    "worst": {
                        label: {q: vars(w) for q, w in by_q.items() if w.values}
                        for label, by_q in r.worst.items()
                    },
                    "configs": r.configs,
                }
                for r in [*results, *half_results]
            ],
        }
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    if args.out:
        Path(args.out).write_text(
            DOC.format(
                rounds=args.rounds,
                seed=args.seed,
                date=date,
                machine=machine_line(info),
                commit=git_commit(ROOT),
                command=command,
                device=args.device,
                seconds=seconds,
                tables=text,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
