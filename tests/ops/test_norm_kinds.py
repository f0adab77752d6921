"""The ops of layer, group, instance and RMS norm against torch.nn.functional (outputs) and a
float64 reference (statistics), over random shapes and parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from normserve.server import ops

TOL = {"atol": 1e-5, "rtol": 1e-5}
EPS = st.sampled_from([1e-5, 1e-3, 0.1])
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _data(g: torch.Generator, shape: list[int]) -> torch.Tensor:
    # well conditioned, as in the batch-norm parity test: every statistic below covers at least 8
    # values of spread ~2, so no variance is tiny next to eps (there float32 rounding, torch's
    # own included, passes 1e-5 for anyone)
    return torch.randn(shape, generator=g) * 2 + float(torch.randn(1, generator=g)) * 3


@st.composite
def trailing_cases(draw: st.DrawFn) -> dict:
    normalized = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    if math.prod(normalized) < 8:
        normalized = [*normalized, 8]
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    return {
        "normalized": normalized,
        "shape": lead + normalized,
        "eps": draw(EPS),
        "affine": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=40, deadline=None)
@given(case=trailing_cases())
def test_layer_norm_matches_torch(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    x = _data(g, case["shape"])
    k = len(case["normalized"])
    w = b = None
    if case["affine"]:
        w, b = torch.rand(case["normalized"], generator=g) + 0.5, torch.randn(case["normalized"])
    out = ops.layer_norm(x, case["normalized"], w, b, case["eps"])
    torch.testing.assert_close(out, F.layer_norm(x, case["normalized"], w, b, case["eps"]), **TOL)
    mean, var = ops.layer_norm_moments(x, k)
    dims = list(range(x.dim() - k, x.dim()))
    assert mean.shape == x.shape[:-k]
    torch.testing.assert_close(mean.double(), x.double().mean(dim=dims), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        var.double(), x.double().var(dim=dims, unbiased=False), rtol=1e-5, atol=1e-6
    )
    # the identity every answer keeps: output = (x - mean) / sqrt(var + eps) * w + b
    shaped = [*mean.shape] + [1] * k
    rebuilt = (x - mean.view(shaped)) * torch.rsqrt(var.view(shaped) + case["eps"])
    if w is not None:
        rebuilt = rebuilt * w + b
    torch.testing.assert_close(out, rebuilt, **TOL)


@settings(max_examples=40, deadline=None)
@given(case=trailing_cases(), unset_eps=st.booleans())
def test_rms_norm_matches_torch(case: dict, unset_eps: bool) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    x = _data(g, case["shape"])
    k = len(case["normalized"])
    eps = None if unset_eps else case["eps"]
    w = torch.rand(case["normalized"], generator=g) + 0.5 if case["affine"] else None
    out = ops.rms_norm(x, case["normalized"], w, eps)
    torch.testing.assert_close(out, F.rms_norm(x, case["normalized"], w, eps), **TOL)
    ms = ops.mean_square(x, k)
    dims = list(range(x.dim() - k, x.dim()))
    torch.testing.assert_close(ms.double(), x.double().square().mean(dim=dims), rtol=1e-6, atol=0)
    rebuilt = x * torch.rsqrt(ms.view([*ms.shape] + [1] * k) + ops.rms_eps(eps, x.dtype))
    torch.testing.assert_close(out, rebuilt if w is None else rebuilt * w, **TOL)


@st.composite
def channel_cases(draw: st.DrawFn, groups: bool) -> dict:
    rank = draw(st.sampled_from([2, 3, 4, 5] if groups else [3, 4, 5]))
    spatial = draw(st.lists(st.integers(1, 4), min_size=rank - 2, max_size=rank - 2))
    num_groups = draw(st.integers(1, 4)) if groups else 1
    per_group = draw(st.integers(1, 4))
    c = num_groups * per_group if groups else draw(st.integers(1, 6))
    values = (per_group if groups else 1) * math.prod(spatial)
    if values < 8:  # well conditioned (see _data): stretch the last dim, or add one
        spatial = [*spatial[:-1], spatial[-1] * -(-8 // values)] if spatial else [8]
    return {
        "shape": [draw(st.integers(1, 4)), c, *spatial],
        "num_groups": num_groups,
        "eps": draw(EPS),
        "affine": draw(st.booleans()),
        "momentum": draw(st.floats(0.01, 1.0)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@settings(max_examples=40, deadline=None)
@given(case=channel_cases(groups=True))
def test_group_norm_matches_torch(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    x = _data(g, case["shape"])
    n, c, groups = x.shape[0], x.shape[1], case["num_groups"]
    w = b = None
    if case["affine"]:
        w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
    out = ops.group_norm(x, groups, w, b, case["eps"])
    torch.testing.assert_close(out, F.group_norm(x, groups, w, b, case["eps"]), **TOL)
    mean, var = ops.group_norm_moments(x, groups)
    ref = x.double().reshape(n, groups, -1)
    assert mean.shape == (n, groups)
    torch.testing.assert_close(mean.double(), ref.mean(dim=2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), ref.var(dim=2, unbiased=False), rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(case=channel_cases(groups=False), steps=st.integers(1, 3))
def test_instance_norm_and_its_running_update_match_torch(case: dict, steps: int) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    c = case["shape"][1]
    module = {3: torch.nn.InstanceNorm1d, 4: torch.nn.InstanceNorm2d, 5: torch.nn.InstanceNorm3d}
    ref = module[len(case["shape"])](
        c,
        eps=case["eps"],
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=True,
    )
    w = b = None
    if case["affine"]:
        w, b = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.bias.copy_(b)
    rm, rv = torch.zeros(c), torch.ones(c)
    for _ in range(steps):
        x = _data(g, case["shape"])
        with torch.no_grad():
            expected = ref(x)
        torch.testing.assert_close(ops.instance_norm(x, w, b, case["eps"]), expected, **TOL)
        mean, var = ops.instance_norm_moments(x)
        flat = x.double().reshape(x.shape[0], c, -1)
        torch.testing.assert_close(mean.double(), flat.mean(dim=2), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            var.double(), flat.var(dim=2, unbiased=False), rtol=1e-5, atol=1e-6
        )
        count = math.prod(x.shape[2:])
        rm, rv = ops.update_running_instances(rm, rv, mean, var, count, case["momentum"])
    torch.testing.assert_close(rm, ref.running_mean, **TOL)
    torch.testing.assert_close(rv, ref.running_var, **TOL)


@pytest.mark.parametrize("dtype", FLOATS)
def test_every_input_dtype_keeps_its_dtype_and_torchs_result(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = _data(g, [3, 4, 2, 8]).to(dtype)
    work = x.double() if dtype == torch.float64 else x.float()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    cases = [
        (ops.layer_norm(x, [2, 8], None, None, 1e-5), F.layer_norm(work, [2, 8])),
        (ops.rms_norm(x, [8], None, None), F.rms_norm(work, [8])),
        (ops.group_norm(x, 2, None, None, 1e-5), F.group_norm(work, 2)),
        (ops.instance_norm(x, None, None, 1e-5), F.instance_norm(work)),
    ]
    for out, ref in cases:
        assert out.dtype == dtype and out.shape == x.shape
        torch.testing.assert_close(out, ref.to(dtype), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rms_eps_unset_is_torchs(dtype: torch.dtype) -> None:
    # tiny values: the eps decides the result, so a wrong one shows
    x = (torch.randn(4, 8, dtype=torch.float64) * 1e-4).to(dtype)
    work = x.double() if dtype == torch.float64 else x.float()
    ms = work.square().mean(dim=-1, keepdim=True)
    expected = F.rms_norm(x, [8]).to(work.dtype)
    ours = work * torch.rsqrt(ms + ops.rms_eps(None, dtype))
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(ours.to(dtype).to(work.dtype), expected, atol=tol, rtol=tol)
    assert ops.rms_eps(0.5, dtype) == 0.5
