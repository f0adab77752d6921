"""Batch renorm's and ghost batch norm's ops against their definitions, over random shapes and
parameters."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normserve.server import ops

TOL = {"atol": 1e-5, "rtol": 1e-5}


@settings(max_examples=60, deadline=None)
@given(
    channels=st.integers(1, 6),
    rows=st.integers(2, 12),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    rmax=st.floats(1.0, 4.0),
    dmax=st.floats(0.0, 6.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_renorm_statistics_turn_normalize_into_the_papers_formula(
    channels: int, rows: int, eps: float, rmax: float, dmax: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, 3, generator=g) * 2 + float(torch.randn(1, generator=g)) * 3
    rm, rv = torch.randn(channels, generator=g), torch.rand(channels, generator=g) * 3
    m = ops.moments(x)
    r, d = ops.renorm_factors(m.mean, m.var, rm, rv, eps, rmax, dmax)
    x64 = x.double()
    mu, var = x64.mean(dim=(0, 2)), x64.var(dim=(0, 2), unbiased=False)
    sigma_b, sigma = (var + eps).sqrt(), (rv.double() + eps).sqrt()
    torch.testing.assert_close(r, (sigma_b / sigma).clamp(1 / rmax, rmax), **TOL)
    torch.testing.assert_close(d, ((mu - rm.double()) / sigma).clamp(-dmax, dmax), **TOL)
    mean, v = ops.renorm_statistics(m.mean, m.var, r, d, eps)
    assert bool((v >= 0).all())
    paper = (x64 - mu.view(1, -1, 1)) / sigma_b.view(1, -1, 1) * r.view(1, -1, 1) + d.view(1, -1, 1)
    got = ops.normalize(x, mean.float(), v.float(), None, None, eps)
    torch.testing.assert_close(got.double(), paper, **TOL)
    # and the output as the kind computes it, with an affine
    w, b = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    out = ops.renorm_apply(x, m, ops.batch_shift(m), r, d, w, b, eps)
    assert out.dtype == x.dtype
    affine = paper * w.double().view(1, -1, 1) + b.double().view(1, -1, 1)
    torch.testing.assert_close(out.double(), affine, **TOL)


@settings(max_examples=100, deadline=None)
@given(start=st.integers(0, 40), rows=st.integers(0, 40), size=st.integers(1, 9))
def test_ghost_splits_follow_the_virtual_batches(start: int, rows: int, size: int) -> None:
    splits = ops.ghost_splits(start, rows, size)
    assert sum(length for _, length, _ in splits) == rows
    for offset, length, begins in splits:
        first, last = start + offset, start + offset + length - 1
        assert first // size == last // size  # one virtual batch each
        assert begins == (first % size == 0)
