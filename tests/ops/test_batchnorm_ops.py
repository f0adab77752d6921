"""The pure ops against torch and a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normserve.server import ops

SHAPES = [(64, 16), (8, 4, 7), (4, 3, 5, 6), (2, 3, 2, 3, 4)]

# The README: "the variance stays accurate to ~1e-7 relative even for data like mean 1e4, std 1e-2".
# A float32 result carries up to 6e-8 of its own rounding; 3e-7 allows a few float32 ulps.
README_VAR_RTOL = 3e-7


def _ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.double()
    dims = ops.reduce_dims(x)
    return x64.mean(dim=dims), x64.var(dim=dims, unbiased=False)


@pytest.mark.parametrize("shape", SHAPES)
def test_moments_match_float64_reference(shape: tuple[int, ...]) -> None:
    x = torch.randn(shape) * 3 + 2
    m = ops.moments(x)
    mean, var = _ref(x)
    assert m.count == x.numel() // x.shape[1]
    torch.testing.assert_close(m.mean, mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.var, var, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_batch_norm_train_matches_torch(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = (torch.randn(shape) * 2 + 3).to(dtype)
    c = shape[1]
    w, b = torch.rand(c) + 0.5, torch.randn(c)
    out, mean, var, _ = ops.batch_norm_train(x, w, b, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    ref_mean, ref_var = _ref(x)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)
    if dtype == torch.float64:
        ref = F.batch_norm(x, None, None, w.double(), b.double(), True, 0.0, 1e-5)
    else:
        ref = torch.nn.functional.batch_norm(x.float(), None, None, w, b, True, 0.0, 1e-5).to(dtype)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("outlier", [0.0, 100.0, 1e4])
@pytest.mark.parametrize(
    "shape",
    [
        (32, 16, 8, 8),
        (64, 2, 16),
        (64, 256),
        (256, 1024),
    ],
)
def test_batch_norm_train_accurate_where_float32_fails(
    shape: tuple[int, ...], outlier: float
) -> None:
    """Mean 1e4, std 1e-2, even when the pivot (each channel's first value) is an outlier: the
    variance to the README's ~1e-7 relative."""
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    x[(0, slice(None), *([0] * (x.dim() - 2)))] += outlier * 1e-2
    _, var64 = _ref(x)
    _, _, var, _ = ops.batch_norm_train(x, None, None, 1e-5)
    rel = ((var.double() - var64).abs() / var64).max().item()
    assert rel <= README_VAR_RTOL, rel


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_fused_running_update_matches_torch(momentum: float | None, dtype: torch.dtype) -> None:
    bn = torch.nn.BatchNorm2d(4, momentum=momentum)
    running = (bn.running_mean.clone(), bn.running_var.clone())
    for n in range(1, 6):
        x = (torch.randn(5, 4, 3, 3) * n + 10 * n).to(dtype)
        before = tuple(t.clone() for t in running)
        ref = bn(x.float()).to(dtype)
        out, _, _, new = ops.batch_norm_train(
            x, None, None, 1e-5, running, ops.ema_factor(momentum, n)
        )
        assert new is not None and all(
            torch.equal(a, b) for a, b in zip(before, running, strict=True)
        )
        running = new
        tol = 2e-3 if dtype == torch.float16 else 1e-5
        torch.testing.assert_close(out, ref.detach(), atol=tol, rtol=tol)
        torch.testing.assert_close(running[0], bn.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(running[1], bn.running_var, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", [(64, 256), (32, 16, 8, 8)])
@pytest.mark.parametrize("chunks", [1, 3, 7])
def test_variance_accurate_where_float32_fails(shape: tuple[int, ...], chunks: int) -> None:
    """Mean 1e4, std 1e-2 in float32: the README's ~1e-7 relative variance error against float64
    on the same float32 values, whole or merged from chunks (measured: 3e-10)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    _, var64 = _ref(x)
    m = None
    for part in x.tensor_split(chunks, dim=0):
        pm = ops.moments(part)
        m = pm if m is None else ops.merge_moments(m, pm)
    assert m is not None
    rel = ((m.var - var64).abs() / var64).max().item()
    assert rel <= README_VAR_RTOL, rel


def test_merge_equals_whole() -> None:
    x = torch.randn(50, 6, 3)
    whole = ops.moments(x)
    a, b, c = ops.moments(x[:7]), ops.moments(x[7:8]), ops.moments(x[8:])
    merged = ops.merge_moments(ops.merge_moments(a, b), c)
    assert merged.count == whole.count
    # Each side sums in float32 before widening, so agreement is to float32 precision.
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged.m2, whole.m2, rtol=1e-5, atol=1e-5)


def test_merge_with_empty_is_identity() -> None:
    m = ops.moments(torch.randn(4, 3))
    empty = ops.Moments(0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert ops.merge_moments(empty, m) is m
    assert ops.merge_moments(m, empty) is m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_normalize_matches_functional_batch_norm(dtype: torch.dtype) -> None:
    x = torch.randn(8, 5, 4, 4).to(dtype)
    mean, var = torch.randn(5), torch.rand(5) + 0.5
    w, b = torch.randn(5), torch.randn(5)
    out = ops.normalize(x, mean, var, w, b, 1e-5)
    assert out.dtype == dtype
    if dtype == torch.float64:
        ref = F.batch_norm(x, mean.double(), var.double(), w.double(), b.double(), False, 0, 1e-5)
    else:
        ref = F.batch_norm(x, mean, var, w, b, False, 0, 1e-5)
    torch.testing.assert_close(out, ref)


def test_half_inputs_use_float32_statistics() -> None:
    x = torch.randn(16, 4, 3, 3).half()
    m = ops.moments(x)
    assert m.mean.dtype == torch.float64
    bn = torch.nn.BatchNorm2d(4)
    ref = bn(x)
    out = ops.normalize(x, m.mean.float(), m.var.float(), None, None, 1e-5)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_running_update_matches_torch(momentum: float | None) -> None:
    bn = torch.nn.BatchNorm1d(6, momentum=momentum)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for n in range(1, 6):
        x = torch.randn(10, 6) * n + n
        bn(x)
        m = ops.moments(x)
        rm, rv = ops.update_running(rm, rv, m.mean, m.var, m.count, ops.ema_factor(momentum, n))
        torch.testing.assert_close(rm, bn.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(rv, bn.running_var, atol=1e-6, rtol=1e-6)


def test_update_running_does_not_mutate_inputs() -> None:
    rm, rv = torch.zeros(3), torch.ones(3)
    m = ops.moments(torch.randn(5, 3) + 4)
    ops.update_running(rm, rv, m.mean, m.var, m.count, 0.5)
    assert rm.eq(0).all() and rv.eq(1).all()


def test_fused_running_update_accurate_where_float32_fails() -> None:
    """The second, shifted pass (a channel with |mean|/std far past the bound) must shift the
    running mean back: running statistics match a float64 computation on the same values."""
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(64, 8, 4, 4, generator=g, dtype=torch.float64) * 1e-2 + 1e4).float()
    # running var starts at 0 so the stored value is the batch's contribution alone (a float32
    # buffer holding 1 + 5e-5 could not show a small relative error of the 5e-5)
    running = (torch.zeros(8), torch.zeros(8))
    _, _, _, new = ops.batch_norm_train(x, None, None, 1e-5, running, 0.5)
    assert new is not None
    x64 = x.double()
    dims = (0, 2, 3)
    mean64, var64 = x64.mean(dim=dims), x64.var(dim=dims, unbiased=True)
    torch.testing.assert_close(new[0].double(), 0.5 * mean64, rtol=1e-6, atol=0)
    rel = ((new[1].double() - 0.5 * var64).abs() / (0.5 * var64)).max().item()
    assert rel <= README_VAR_RTOL, rel  # measured: 7e-8
