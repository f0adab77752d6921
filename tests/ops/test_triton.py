"""The Triton batch-norm kernels (ops._triton): torch parity, accuracy on ill-conditioned
channels, both layouts, and the dispatch from ops. On a CUDA machine they run compiled on the
GPU; elsewhere through Triton's interpreter on the CPU (small shapes: it runs programs one by one),
so the CUDA path's code is tested in every CI run. Skipped where Triton is not installed."""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    # Triton reads this as it is imported and as a kernel is defined: set before both
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from normserve.server import ops  # noqa: E402
from normserve.server.ops import _batchnorm  # noqa: E402
from normserve.server.ops import _triton as kernels  # noqa: E402

if not CUDA and not type(kernels._rc_fused).__name__.startswith("Interpreted"):
    kernels = importlib.reload(kernels)  # imported before, compiled: define them interpreted

# (shape, channels_last): [N, C] (one launch, and the split path past 4096 rows), NCHW, NHWC,
# [N, C, L], NCDHW and NDHWC
SHAPES = [
    ((64, 24), False),
    ((4100, 3), False),
    ((3, 5, 7, 9), False),
    ((3, 5, 7, 9), True),
    ((4, 3, 10), False),
    ((2, 4, 3, 3, 3), False),
    ((2, 4, 3, 3, 3), True),
]


def _input(shape: tuple[int, ...], cl: bool, dtype: torch.dtype, g: torch.Generator,
           loc: float = 1.0, scale: float = 2.0) -> torch.Tensor:  # fmt: skip
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc).to(dtype)
    if cl:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x.to(DEVICE)


def _reference(
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    rm: torch.Tensor,
    rv: torch.Tensor,
    factor: float,
) -> tuple[torch.Tensor, ...]:
    """float64 torch: output, mean, biased var, running mean and var after the update."""
    rm64, rv64 = rm.double(), rv.double()
    xd = x.double()
    y = torch.nn.functional.batch_norm(
        xd, rm64, rv64, None if w is None else w.double(), None if b is None else b.double(),
        True, factor, 1e-5,
    )  # fmt: skip
    dims = [0, *range(2, x.dim())]
    return y, xd.mean(dims), xd.var(dims, unbiased=False), rm64, rv64


@pytest.mark.parametrize("shape,cl", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_train_matches_torch_float32(shape: tuple[int, ...], cl: bool, affine: bool) -> None:
    g = torch.Generator().manual_seed(len(shape) * 7 + int(cl))
    x = _input(shape, cl, torch.float32, g)
    c = shape[1]
    w = torch.randn(c, generator=g).to(DEVICE) if affine else None
    b = torch.randn(c, generator=g).to(DEVICE) if affine else None
    rm = torch.randn(c, generator=g).to(DEVICE)
    rv = (torch.rand(c, generator=g) + 0.5).to(DEVICE)
    rm0, rv0 = rm.clone(), rv.clone()
    assert kernels.applicable(x)
    y, mean, var, new = kernels.batch_norm_train(x, w, b, 1e-5, (rm, rv), 0.1)
    yr, mr, vr, rmr, rvr = _reference(x, w, b, rm, rv, 0.1)
    assert y is not None and new is not None
    assert y.dtype == x.dtype and y.shape == x.shape and y.stride() == x.stride()
    assert (y.double() - yr).abs().max().item() <= 1e-5
    assert (mean.double() - mr).abs().max().item() <= 1e-5
    assert ((var.double() - vr).abs() / vr).max().item() <= 1e-5
    assert (new[0].double() - rmr).abs().max().item() <= 1e-5
    assert (new[1].double() - rvr).abs().max().item() <= 1e-5
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # the snapshot is never written


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape,cl", [((64, 24), False), ((3, 5, 7, 9), False), ((3, 5, 7, 9), True)]
)
def test_train_half_precision_as_torch_computes_it(
    dtype: torch.dtype, shape: tuple[int, ...], cl: bool
) -> None:
    """Half inputs are computed in float32 (as torch does); only the output is rounded."""
    g = torch.Generator().manual_seed(3)
    x = _input(shape, cl, dtype, g)
    y, mean, _, new = kernels.batch_norm_train(x, None, None, 1e-5, None, 0.1)
    assert new is None and y is not None and y.dtype == dtype
    ref = torch.nn.functional.batch_norm(x.float(), None, None, None, None, True, 0.1, 1e-5)
    dims = [0, *range(2, x.dim())]
    assert (mean.double() - x.double().mean(dims)).abs().max().item() <= 1e-5
    assert (y.float() - ref).abs().max().item() <= 2 * torch.finfo(dtype).eps * 4


@pytest.mark.parametrize(
    "shape,cl", [((256, 8), False), ((16, 4, 6, 6), False), ((16, 4, 6, 6), True)]
)
def test_ill_conditioned_channels_stay_accurate(shape: tuple[int, ...], cl: bool) -> None:
    """Mean 1e4, std 1e-2: float32 sums of raw values would lose the variance entirely; shifted
    by the pivot they keep it to ~1e-6 relative (the CPU path's bound, 1e-4 allowed)."""
    g = torch.Generator().manual_seed(11)
    x = _input(shape, cl, torch.float32, g, loc=1e4, scale=1e-2)
    ref_var = x.double().var(dim=[0, *range(2, x.dim())], unbiased=False)
    var = kernels.batch_norm_train(x, None, None, 1e-5, None, 0.1)[2]
    assert ((var.double() - ref_var).abs() / ref_var).max().item() <= 1e-4
    y = kernels.batch_norm_train(x, None, None, 0.0, None, 0.1)[0]
    assert y is not None
    ref = (
        x.double() - x.double().mean([0, *range(2, x.dim())], keepdim=True)
    ) / ref_var.sqrt().view(1, -1, *[1] * (x.dim() - 2))
    assert (y.double() - ref).abs().max().item() <= 1e-3


@pytest.mark.parametrize("shape,cl", [SHAPES[0], SHAPES[2], SHAPES[3]])
def test_moments_of_chunks_merge_to_the_whole(shape: tuple[int, ...], cl: bool) -> None:
    g = torch.Generator().manual_seed(5)
    x = _input(shape, cl, torch.float32, g, loc=50.0)
    count, mean64, m2, pivot, _, _ = kernels.moments_sums(x)
    dims = [0, *range(2, x.dim())]
    assert count == x.numel() // x.shape[1]
    assert mean64.dtype == torch.float64 and pivot.dtype == torch.float32
    assert (mean64 - x.double().mean(dims)).abs().max().item() <= 1e-6  # of 50: 2e-8
    ref_var = x.double().var(dims, unbiased=False)
    assert ((m2 / count - ref_var).abs() / ref_var).max().item() <= 1e-6
    # through ops: chunks merged (Chan) and normalized around the first chunk's pivot
    chunks = x.tensor_split(2)
    with _on_cpu():
        merged = ops.merge_moments(ops.moments(chunks[0]), ops.moments(chunks[1]))
        shift = ops.batch_shift(merged)
        out = torch.cat([ops.normalize_batch(c, merged, None, None, 1e-5, shift) for c in chunks])
    ref = torch.nn.functional.batch_norm(x.double(), None, None, None, None, True, 0.0, 1e-5)
    assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape,cl", SHAPES)
def test_eval_normalize_matches_torch(shape: tuple[int, ...], cl: bool) -> None:
    g = torch.Generator().manual_seed(9)
    x = _input(shape, cl, torch.float32, g)
    c = shape[1]
    mean = torch.randn(c, generator=g).to(DEVICE)
    var = (torch.rand(c, generator=g) + 0.1).to(DEVICE)
    w, b = torch.randn(c, generator=g).to(DEVICE), torch.randn(c, generator=g).to(DEVICE)
    y = kernels.normalize(x, mean, var, w, b, 1e-5)
    ref = torch.nn.functional.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5)
    assert y.stride() == x.stride()
    assert (y - ref).abs().max().item() <= 1e-5


def test_what_the_kernels_leave_to_torch() -> None:
    assert not kernels.applicable(torch.randn(4, 3, dtype=torch.float64))  # float64: torch's
    assert not kernels.applicable(torch.randn(3, 4).t())  # other strides
    assert not kernels.applicable(torch.randn(0, 3))  # no values
    assert not kernels.applicable(torch.randn(1, 3))  # one value per channel
    assert not kernels.applicable(torch.randn(2, 3, 4, 5)[:, :, ::2])  # a strided view
    assert kernels.applicable(torch.randn(2, 3))


class _Patch:
    """Runs ops' CUDA dispatch on CPU tensors too (through the interpreter)."""

    def __enter__(self) -> None:
        self.saved = (_batchnorm._KERNELS_ON_CPU, _batchnorm._triton)
        _batchnorm._KERNELS_ON_CPU = not CUDA
        _batchnorm._triton = kernels

    def __exit__(self, *exc: object) -> None:
        _batchnorm._KERNELS_ON_CPU, _batchnorm._triton = self.saved


def _on_cpu() -> _Patch:
    return _Patch()


@pytest.fixture
def kernels_on_cpu() -> Iterator[None]:
    with _on_cpu():
        yield


def test_ops_dispatch_to_the_kernels(kernels_on_cpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.batch_norm_train, moments and normalize take the Triton path for batches it suits and
    torch's for the rest (float64), with the same answers."""
    calls: list[str] = []
    for name in ("batch_norm_train", "moments_sums", "normalize"):
        fn = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _f=fn, _n=name, **k: (calls.append(_n), _f(*a, **k))[1]
        )
    g = torch.Generator().manual_seed(2)
    x = _input((8, 4, 3, 3), False, torch.float32, g)
    rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
    out, mean, var, _ = ops.batch_norm_train(x, None, None, 1e-5, (rm, rv), 0.1)
    ops.moments(x)
    ops.normalize(x, mean, var, None, None, 1e-5)
    assert calls == ["batch_norm_train", "moments_sums", "normalize"]
    ops.batch_norm_train(x.double(), None, None, 1e-5, None, 0.1)
    assert calls == ["batch_norm_train", "moments_sums", "normalize"]  # float64 stayed with torch
    ref = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), None, None, True, 0.1, 1e-5)
    assert (out - ref).abs().max().item() <= 1e-5


def test_a_server_session_through_the_kernels(kernels_on_cpu: None) -> None:
    """A session's unary TRAIN and EVAL calls and a chunked stream batch, served through the
    Triton path, against torch.nn.BatchNorm2d."""
    from normserve.client import Client
    from normserve.server import Settings, start_server

    srv = start_server(Settings(address="127.0.0.1:0", metrics_address="off", device=DEVICE))
    try:
        g = torch.Generator().manual_seed(4)
        ref = torch.nn.BatchNorm2d(3, momentum=0.1).double()
        with Client(srv.address, chunk_bytes=4096) as client:
            info = client.create_session(3, momentum=0.1)
            for i in range(4):
                x = torch.randn(6, 3, 5, 5, generator=g) * 2 + 3
                mode = "train" if i < 3 else "eval"
                ref.train(mode == "train")
                want = ref(x.double())
                got = client.normalize(info.session_id, x, mode=mode).output
                assert (got.double() - want).abs().max().item() <= 1e-5
            # 40 x 3 x 5 x 5 float32 = 12 KB: streamed in 4 KB chunks
            big = torch.randn(40, 3, 5, 5, generator=g) + 1
            ref.train(True)
            want = ref(big.double())
            got = next(iter(client.normalize_stream(info.session_id, [big], mode="train"))).output
            assert (got.double() - want).abs().max().item() <= 1e-5
            state = client.get_session(info.session_id)
            assert (state.running_mean.double() - ref.running_mean).abs().max().item() <= 1e-5
            assert (state.running_var.double() - ref.running_var).abs().max().item() <= 1e-5
    finally:
        srv.stop(0)
