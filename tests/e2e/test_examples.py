"""The examples as a user runs them: each script a subprocess against a real server, small sizes
via its flags, and what it prints or saves checked against torch computed here."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from normserve.client import Client
from normserve.server import Server

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Runs ``examples/<name>`` as a user would; returns its stdout (fails with its stderr)."""
    cmd = [sys.executable, str(EXAMPLES / name)] if name.endswith(".py") else [str(EXAMPLES / name)]
    # the venv's scripts (``normserve``) on PATH, as after activating it
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    proc = subprocess.run(
        [*cmd, *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "PATH": path, **(env or {})},
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def load_example(name: str) -> ModuleType:
    """Imports ``examples/<name>.py`` as a module (its helpers build the local twin)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def line(pattern: str, text: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return match


def no_sessions_left(client: Client) -> None:
    assert [s.session_id for s in client.list_sessions()] == []


# ---- every example documents itself and is listed


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_example_docstring_says_what_and_how(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path.name} has no module docstring"
    assert f"python examples/{path.name} --target 127.0.0.1:50051" in doc
    assert "NORMSERVE_TARGET" in doc


def test_examples_readme_lists_every_example() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    scripts = sorted(p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh"))
    assert scripts
    for name in scripts:
        assert f"examples/{name}" in readme, name
    assert "scripts/serve" in readme


# ---- train_remote_bn.py: RemoteBatchNorm2d trains like torch.nn.BatchNorm2d


def test_train_remote_bn_trains_like_local_batchnorm(
    server: Server, client: Client, tmp_path: Path
) -> None:
    samples, epochs, batch = 400, 3, 16
    saved = tmp_path / "model.pt"
    out = run_example(
        "train_remote_bn.py",
        *("--target", server.address, "--data", "synthetic", "--samples", str(samples)),
        *("--epochs", str(epochs), "--batch-size", str(batch), "--save", str(saved)),
        env={"OMP_NUM_THREADS": "1"},  # its tiny kernels: threads would only contend
    )
    losses = [float(v) for v in re.findall(r"^epoch \d+: loss ([\d.]+)$", out, re.MULTILINE)]
    assert len(losses) == epochs, out
    assert losses[-1] < 0.5 * losses[0], losses
    accuracy = float(line(r"^test accuracy: ([\d.]+)$", out).group(1))
    assert accuracy > 0.5  # 10 classes: chance is 0.1

    # The twin: the same model, data, seed and loop with torch's own BatchNorm2d.
    ex = load_example("train_remote_bn")
    x, y = ex.load_data("synthetic", samples, 0)
    n_test = int(samples * 0.25)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: a thread pool only adds contention with the server
    try:
        torch.manual_seed(0)
        twin = ex.build_model(nn.BatchNorm2d)
        twin_losses = ex.train(
            twin, x[n_test:], y[n_test:], epochs=epochs, batch_size=batch, lr=0.05, seed=0,
            log=lambda _: None,
        )  # fmt: skip
        twin_accuracy = ex.accuracy(twin, x[:n_test], y[:n_test])
    finally:
        torch.set_num_threads(threads)
    assert losses == pytest.approx(twin_losses, abs=2e-4)
    assert abs(accuracy - twin_accuracy) <= 1.5 / n_test  # at most one prediction flips

    # The saved state_dict: conv/linear weights (so the gradients matched), the affine
    # parameters and the running statistics the server kept, all like the twin's.
    remote = torch.load(saved, weights_only=True)
    local = twin.state_dict()
    assert list(remote) == list(local)
    for key, value in local.items():
        torch.testing.assert_close(
            remote[key], value, rtol=1e-4, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
    batches_per_epoch = -(-(samples - n_test) // batch)
    assert int(remote["1.num_batches_tracked"]) == epochs * batches_per_epoch
    assert len(re.findall(rf"num_batches_tracked {epochs * batches_per_epoch},", out)) == 2
    assert "deleted 2 sessions" in out
    no_sessions_left(client)


# ---- eval_serving.py: concurrent EVAL from an imported state_dict


@pytest.mark.parametrize("flags", [(), ("--asyncio",)], ids=["threads", "asyncio"])
def test_eval_serving_matches_torch_eval_and_leaves_the_session_alone(
    server: Server, client: Client, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    clients, requests, channels = 4, 8, 6
    saved = tmp_path / "serving.pt"
    out = run_example(
        "eval_serving.py",
        *("--target", server.address, "--channels", str(channels), "--batch", "5"),
        *("--size", "3", "--clients", str(clients), "--requests", str(requests)),
        *("--save", str(saved), *flags),
    )
    data = torch.load(saved, weights_only=True)
    bn = nn.BatchNorm2d(channels)
    bn.load_state_dict(data["state_dict"])
    bn.eval()
    assert data["state_dict"]["num_batches_tracked"] > 0  # a trained state, not the default
    assert len(data["inputs"]) == len(data["outputs"]) == clients * requests
    with torch.no_grad():
        for x, y in zip(data["inputs"], data["outputs"], strict=True):
            assert x.shape == y.shape == (5, channels, 3, 3)
            torch.testing.assert_close(y, bn(x), rtol=0, atol=1e-5)
    assert data["version_after"] == data["version_before"]
    for key, value in data["state_dict"].items():
        assert torch.equal(data["state_after"][key], value), key
    assert "after: unchanged, state unchanged" in out
    err = float(line(r"^max \|output - torch BatchNorm2d.eval\(\)\| = (\S+)$", out).group(1))
    assert err <= 1e-5
    pct = line(r"^latency ms: p50 (\S+)\s+p90 (\S+)\s+p99 (\S+)\s+max (\S+)$", out)
    p50, p90, p99, pmax = (float(v) for v in pct.groups())
    assert 0 < p50 <= p90 <= p99 <= pmax
    line(rf"^serving {clients} {'asyncio tasks' if flags else 'threads'} x {requests} EVAL", out)
    no_sessions_left(client)


# ---- calibration.py: precise batch norm (the calibration API) against the old recipe


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1)


@pytest.mark.parametrize("model", [False, True], ids=["context-manager", "recalibrate-model"])
def test_calibration_commits_the_dataset_statistics(
    server: Server, client: Client, tmp_path: Path, model: bool
) -> None:
    saved = tmp_path / "calibration.pt"
    out = run_example(
        "calibration.py",
        *("--channels", "5", "--size", "4", "--batch", "32", "--batches", "12"),
        *("--save", str(saved), *(("--model",) if model else ())),
        env={"NORMSERVE_TARGET": server.address},  # the default target
    )
    data = torch.load(saved, weights_only=True)
    calib = data["calibration_data"]
    assert calib.shape == (32 * 12, 5, 4, 4)
    sizes = data["batch_sizes"]
    assert sum(sizes) == len(calib) and len(sizes) == 12
    assert len(set(sizes)) > 1 and min(sizes) > 1  # unequal batches, each a valid one
    mean, var = _channel_stats(calib)

    # The commit installed the population mean and unbiased variance (float64 accumulation,
    # float32 storage): equal within 1e-6 relative.
    after_mean, after_var = data["after"]["mean"].double(), data["after"]["var"].double()
    assert ((after_mean - mean).abs() / mean.abs()).max() <= 1e-6
    assert ((after_var - var).abs() / var).max() <= 1e-6
    nbt = data["num_batches_tracked"]
    assert nbt["after"] == nbt["before"] == 30  # the commit leaves the count alone

    # The old recipe averaged the batches' means and unbiased variances, every batch weighing
    # the same (torch's momentum=None), which the same tolerance tells from the population.
    batches = calib.split(sizes)
    per_batch = [_channel_stats(b) for b in batches]
    old_mean, old_var = data["old"]["mean"].double(), data["old"]["var"].double()
    torch.testing.assert_close(old_mean, torch.stack([m for m, _ in per_batch]).mean(0))
    torch.testing.assert_close(
        old_var, torch.stack([v for _, v in per_batch]).mean(0), rtol=1e-5, atol=0
    )
    assert nbt["old"] == len(batches)
    assert ((old_var - var).abs() / var).max() > 1e-4
    assert ((old_mean - mean).abs() / mean.abs()).max() > 1e-5

    # EVAL during the calibration answered with the old statistics, bit for bit, and those
    # were far from the new traffic's.
    assert torch.equal(data["during"]["mean"], data["before"]["mean"])
    assert torch.equal(data["during"]["var"], data["before"]["var"])
    assert (data["before"]["mean"].double() - mean).abs().max() > 1.0
    assert torch.equal(data["serving_state"]["running_mean"], data["after"]["mean"])
    assert torch.equal(data["serving_state"]["running_var"], data["after"]["var"])

    # What it prints: the figures above, and EVAL on the shifted traffic centred and scaled
    # only after the commit.
    how = "recalibrate(model, batches)" if model else "client.calibration()"
    line(rf"^{re.escape(how)}: 12 batches of {min(sizes)} to {max(sizes)} images$", out)
    line(r"^  during the calibration \(1 batch, \d+ samples so far\): EVAL", out)
    drift = re.findall(r"EVAL on shifted traffic: mean \|mean\| (\S+), mean \|std - 1\| (\S+)", out)
    assert len(drift) == 3, out
    before, during, after = ((float(a), float(b)) for a, b in drift)
    assert before == during and before[0] > 1.0 and before[1] > 0.5
    assert after[0] < 0.2 and after[1] < 0.2
    figures = r"\s+(\S+)\s+(\S+)$"
    new = [float(v) for v in line(rf"^  calibration API{figures}", out).groups()]
    old = [float(v) for v in line(rf"^  statistics_only, momentum=None{figures}", out).groups()]
    assert max(new) <= 1e-6 < 1e-4 < min(old)
    assert "deleted 2 sessions" in out
    no_sessions_left(client)


# ---- load_test.sh: normserve bench, closed and open loop, compared


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_load_test_reports(server: Server, client: Client, tmp_path: Path) -> None:
    plot = importlib.util.find_spec("matplotlib") is not None
    out = run_example(
        "load_test.sh",
        *("--target", server.address, "--duration", "0.5", "--warmup", "0.1"),
        *("--concurrency", "2", "--rate", "40", "--shape", "8,16", "--out", str(tmp_path)),
        *(("--plot",) if plot else ()),
    )
    closed = json.loads((tmp_path / "closed.json").read_text())
    opened = json.loads((tmp_path / "open.json").read_text())
    for result, mode in ((closed, "train"), (opened, "eval")):
        assert result["format"] == "normserve-bench"
        assert result["config"]["target"] == server.address
        assert result["config"]["shape"] == [8, 16]
        assert result["config"]["mode"] == mode
        assert result["config"]["duration_s"] == 0.5
        summary = result["summary"]
        assert summary["count"] > 0
        assert summary["errors"] == {}
        assert summary["bytes_per_request"] == 8 * 16 * 4
        lat = summary["latency_us"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert closed["config"]["concurrency"] == 2
    assert closed["config"]["rate"] is None
    assert opened["config"]["rate"] == 40.0
    # an open loop never sends more than its schedule: 40/s over the 0.5 s measured
    assert opened["summary"]["count"] <= 21
    # the printed reports and the comparison
    assert len(re.findall(r"^count\s+\d+ ok, 0 errors", out, re.MULTILINE)) == 2, out
    assert re.search(r"^p99\s+\S+ms\s+\S+ms\s+\S+x$", out, re.MULTILINE), out
    assert f"results in {tmp_path}" in out
    if plot:
        assert (tmp_path / "closed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_sessions_left(client)


# ---- small_batch.py: batch 2 x 4 devices, four normalizations


def _twin_curve(
    ex: ModuleType, variant: str, steps: int, eval_every: int, lr: float
) -> list[tuple[float, float]]:
    """What the example's 4 processes compute, in one process: the same initial weights, batches
    and optimizer, the gradient of the mean loss over the 8 images of a step (DDP's average of
    the 4 devices' means); (test accuracy, test loss) every ``eval_every`` steps. ``pooled-bn``
    is one BatchNorm2d over all 8 images; ``local-bn`` normalizes each device's 2 alone and keeps
    rank 0's running statistics (momentum 0 for the others); ``group-norm`` needs no batch."""
    x_train, y_train, x_test, y_test = ex.load_data(0, 0.25)
    world = 4
    batches = [ex.batch_indices(len(y_train), world, r, 2, steps, 0) for r in range(world)]
    torch.manual_seed(0)
    model = ex.build_model(nn.BatchNorm2d if "bn" in variant else lambda c: nn.GroupNorm(4, c))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    opt = ex.optimizer(model, lr)
    curve = []
    for step in range(steps + 1):
        if step % eval_every == 0:
            curve.append(ex.evaluate(model, x_test, y_test))
        if step == steps:
            break
        if variant == "local-bn":
            losses = []
            for r in range(world):
                for bn in bns:
                    bn.momentum = 0.1 if r == 0 else 0.0
                idx = batches[r][step]
                losses.append(nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]))
            loss = torch.stack(losses).mean()
        else:
            idx = torch.cat([b[step] for b in batches])
            loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return curve


def test_small_batch_pooled_statistics_equal_one_batch_norm_over_all_devices(
    server: Server, client: Client, tmp_path: Path
) -> None:
    steps, every, lr = 20, 10, 0.02
    png, saved = tmp_path / "small_batch.png", tmp_path / "small_batch.json"
    out = run_example(
        "small_batch.py",
        *("--target", server.address, "--steps", str(steps), "--eval-every", str(every)),
        *("--lr", str(lr), "--out", str(png), "--json", str(saved)),
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    variants = ("local-bn", "pooled-bn", "group-norm", "batch-renorm")
    table = {
        m.group(1): (float(m.group(2)), float(m.group(3)))
        for m in re.finditer(r"^(\S+)\s.*?\s([\d.]+)\s+([\d.]+)\s+[\d.]+$", out, re.MULTILINE)
    }
    assert sorted(table) == sorted(variants), out
    data = json.loads(saved.read_text())
    curves = {v: [(p["accuracy"], p["loss"]) for p in data["curves"][v]] for v in variants}
    for v in variants:
        final, quarter = table[v]
        assert 0.0 <= final <= 1.0 and 0.0 <= quarter <= 1.0
        assert [p["step"] for p in data["curves"][v]] == [0, 10, 20]
        assert curves[v][-1][0] == pytest.approx(final, abs=5e-5)
        assert data["final_accuracy"][v] == pytest.approx(final, abs=5e-5)
        assert data["last_quarter_accuracy"][v] == pytest.approx(quarter, abs=5e-5)
    # the untrained networks: batch norm at its start is the same local, pooled or renormed
    for v in ("pooled-bn", "batch-renorm"):
        assert curves[v][0] == pytest.approx(curves["local-bn"][0], rel=1e-5)

    # The 4 processes against one process that does the same: pooled statistics are one batch
    # norm over the 8 images of a step, local batch norm 4 of 2 each. Float32 rounding of the
    # all-reduce and the server's merge may move the loss a little and flip one test image.
    ex = load_example("small_batch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        twins = {v: _twin_curve(ex, v, steps, every, lr) for v in variants[:3]}
    finally:
        torch.set_num_threads(threads)
    n_test = len(ex.load_data(0, 0.25)[3])
    for v, twin in twins.items():
        for (acc, loss), (twin_acc, twin_loss) in zip(curves[v], twin, strict=True):
            assert acc == pytest.approx(twin_acc, abs=1.5 / n_test), v
            assert loss == pytest.approx(twin_loss, rel=1e-4), v
    # and that tolerance tells pooled statistics from local ones (they differ by ~0.6% here)
    assert twins["pooled-bn"][-1][1] != pytest.approx(twins["local-bn"][-1][1], rel=1e-3)
    no_sessions_left(client)


def test_small_batch_starts_a_server_of_its_own_without_a_target(tmp_path: Path) -> None:
    png, saved = tmp_path / "renorm.png", tmp_path / "renorm.json"
    out = run_example(
        "small_batch.py",
        *("--variants", "batch-renorm", "--devices", "2", "--steps", "3", "--eval-every", "2"),
        *("--out", str(png), "--json", str(saved)),
        env={"NORMSERVE_TARGET": ""},
    )
    assert re.search(r"^started a normserve server on 127\.0\.0\.1:\d+$", out, re.MULTILINE), out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(saved.read_text())
    assert list(data["curves"]) == ["batch-renorm"]
    assert [p["step"] for p in data["curves"]["batch-renorm"]] == [0, 2, 3]
    assert 0.0 <= data["final_accuracy"]["batch-renorm"] <= 1.0
