"""The CUDA path: same results as torch on CUDA and as the CPU path. Skipped without CUDA;
scripts/gpu-check runs these on a GPU machine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from normserve.client import Client
from normserve.server import Server, Settings, ops, start_server
from normserve.server.service import Mode, SessionConfig, SessionManager

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def gpu_server() -> Iterator[Server]:
    srv = start_server(
        Settings(address="127.0.0.1:0", metrics_address="127.0.0.1:0", device="cuda")
    )
    yield srv
    srv.stop(0)


def test_auto_device_picks_cuda() -> None:
    assert SessionManager("auto").default_device == torch.device("cuda", 0)


def test_cuda_accuracy_where_float32_fails() -> None:
    x = (torch.randn(64, 32, 8, 8, dtype=torch.float64) * 1e-2 + 1e4).float().cuda()
    ref = x.double().var(dim=(0, 2, 3), unbiased=False)
    for chunks in (1, 5):
        m = None
        for part in x.tensor_split(chunks):
            pm = ops.moments(part)
            m = pm if m is None else ops.merge_moments(m, pm)
        assert ((m.var - ref).abs() / ref).max().item() <= 1e-4


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_200_mixed_calls_match_torch_on_cuda(
    gpu_server: Server, dims: int, momentum: float | None
) -> None:
    g = torch.Generator().manual_seed(dims)
    module = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims]
    ref = module(6, momentum=momentum).cuda()
    with Client(gpu_server.address) as client:
        info = client.create_session(6, momentum=momentum)
        assert info.device == "cuda:0"
        for i in range(200):
            mode = "train" if torch.rand(1, generator=g).item() < 0.6 else "eval"
            spatial = torch.randint(1, 4, (dims if dims > 1 else 1,), generator=g).tolist()
            x = (torch.randn([8, 6, *spatial], generator=g) * 2 + 1).cuda()
            ref.train(mode == "train")
            with torch.no_grad():
                expected = ref(x)
            got = client.normalize(info.session_id, x, mode=mode).output
            assert got.device == x.device
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"call {i}")
        state = client.get_session(info.session_id)
        torch.testing.assert_close(state.running_var, ref.running_var.cpu(), atol=1e-5, rtol=1e-5)
        assert state.num_batches_tracked == int(ref.num_batches_tracked)


def test_cpu_and_cuda_sessions_agree() -> None:
    manager = SessionManager("cpu")
    cpu = manager.create(SessionConfig(8), "cpu")
    gpu = manager.create(SessionConfig(8, device="cuda"), "gpu")
    for _ in range(10):
        x = torch.randn(16, 8, 5, 5) * 3 + 1
        a = cpu.normalize(x, Mode.TRAIN)
        b = gpu.normalize(x, Mode.TRAIN)
        torch.testing.assert_close(b.output.cpu(), a.output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        gpu.state.running_var.cpu(), cpu.state.running_var, atol=1e-6, rtol=1e-6
    )


def test_chunked_stream_on_cuda(gpu_server: Server) -> None:
    x = torch.randn(64, 16, 32, 32)
    with Client(gpu_server.address) as client:
        sid = client.create_session(16).session_id
        r = client.normalize(sid, x)
    ref = torch.nn.BatchNorm2d(16).cuda()
    torch.testing.assert_close(r.output, ref(x.cuda()).cpu(), atol=1e-5, rtol=1e-5)


def test_concurrent_calls_on_their_own_streams_match_torch(gpu_server: Server) -> None:
    """8 client threads, each training its own session with unary and streamed (chunked) TRAIN
    calls then EVAL: every answer and final state as torch's. Each worker queues its kernels on
    its own CUDA stream and waits for that stream only, so this checks that a committed state
    is complete before another thread reads it, and that outputs are copied back whole."""
    import threading

    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            g = torch.Generator().manual_seed(seed)
            ref = torch.nn.BatchNorm2d(8, momentum=0.1).double()
            with Client(gpu_server.address, chunk_bytes=64 * 1024) as client:
                sid = client.create_session(8, momentum=0.1).session_id
                for i in range(30):
                    rows = 4 if i % 3 else 96  # every third batch is streamed in chunks
                    x = torch.randn(rows, 8, 6, 6, generator=g) * (seed + 1) + seed
                    got = client.normalize(sid, x, mode="train").output
                    want = ref(x.double())
                    assert (got.double() - want).abs().max().item() <= 1e-4 * (seed + 1)
                ref.eval()
                x = torch.randn(16, 8, 6, 6, generator=g)
                got = client.normalize(sid, x, mode="eval").output
                assert (got.double() - ref(x.double())).abs().max().item() <= 1e-4
                info = client.get_session(sid)
                torch.testing.assert_close(
                    info.running_mean.double(), ref.running_mean, atol=1e-4, rtol=1e-5
                )
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_calibration_and_adaptation_on_cuda(gpu_server: Server) -> None:
    """The accumulator stays on the CPU in float64; batches, adapted statistics and commits run
    on the session's device: the CPU path's exact population statistics and mix."""
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, 4, 3, 3, generator=g) * 2 + 3 for n in (3, 11, 6)]
    with Client(gpu_server.address) as client:
        sid = client.create_session(4, momentum=0.1).session_id
        assert client.get_session(sid).device == "cuda:0"
        with client.calibration(sid):
            for x in xs:
                client.normalize(sid, x.cuda(), mode="calibrate")
        info = client.get_session(sid)
        flat = torch.cat([x.double().transpose(0, 1).reshape(4, -1) for x in xs], dim=1)
        torch.testing.assert_close(info.running_mean.double(), flat.mean(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(info.running_var.double(), flat.var(1), rtol=1e-6, atol=0)
        x = xs[1].cuda()
        r = client.normalize(sid, x, adapt=0.25, adapt_accumulate=True)
        bm = xs[1].double().mean(dim=(0, 2, 3))
        want = 0.75 * info.running_mean.double() + 0.25 * bm
        torch.testing.assert_close(r.mean.double(), want, rtol=1e-6, atol=1e-6)
        assert r.output.is_cuda
        promoted = client.promote_adaptation(sid)
        assert promoted.adapted_batches is None and promoted.version == info.version + 2
