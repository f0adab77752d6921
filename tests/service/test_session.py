"""The session layer on its own: torch semantics, state, chunked batches, concurrency."""

from __future__ import annotations

import threading

import pytest
import torch

from normserve.server.service import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    Mode,
    NotFound,
    SessionConfig,
    SessionManager,
)


@pytest.fixture
def manager() -> SessionManager:
    return SessionManager("cpu")


def test_train_then_eval_matches_torch(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(5, momentum=None))
    bn = torch.nn.BatchNorm2d(5, momentum=None)
    for _ in range(4):
        x = torch.randn(6, 5, 3, 3) * 2 + 1
        out = s.normalize(x, Mode.TRAIN).output
        torch.testing.assert_close(out, bn(x), atol=1e-5, rtol=1e-5)
    bn.eval()
    x = torch.randn(3, 5, 3, 3)
    torch.testing.assert_close(s.normalize(x, Mode.EVAL).output, bn(x), atol=1e-5, rtol=1e-5)
    assert s.state.num_batches_tracked == 4
    assert s.state.version == 5  # created at 1, four updates


def test_eval_and_untracked_calls_do_not_change_state(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(3))
    before = s.state
    s.normalize(torch.randn(4, 3), Mode.EVAL)
    assert s.state is before
    u = manager.create(SessionConfig(3, track_running_stats=False))
    before = u.state
    r = u.normalize(torch.randn(4, 3), Mode.TRAIN)
    assert r.batch_statistics and u.state is before


def test_statistics_only_updates_without_output(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(3))
    r = s.normalize(torch.randn(8, 3), Mode.TRAIN, statistics_only=True)
    assert r.output is None and r.version == 2 and s.state.num_batches_tracked == 1


def test_chunked_batch_equals_whole(manager: SessionManager) -> None:
    a = manager.create(SessionConfig(4))
    b = manager.create(SessionConfig(4))
    x = torch.randn(11, 4, 5) * 3 + 7
    whole = a.normalize(x, Mode.TRAIN)
    batch = b.start_batch(Mode.TRAIN)
    for part in x.tensor_split([2, 3, 9]):
        batch.add(part)
    result, count = batch.finish()
    outputs = list(batch.outputs())
    assert count == len(outputs) == 4
    torch.testing.assert_close(torch.cat(outputs), whole.output)
    torch.testing.assert_close(b.state.running_var, a.state.running_var)
    assert result.version == whole.version


def test_failed_chunked_batch_applies_nothing(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(4))
    before = s.state
    batch = s.start_batch(Mode.TRAIN)
    batch.add(torch.randn(3, 4, 2))
    with pytest.raises(InvalidArgument, match=r"chunk.shape: chunks of one batch may differ"):
        batch.add(torch.randn(3, 4, 3))
    with pytest.raises(InvalidArgument, match=r"chunk.dtype: chunks of one batch must share"):
        batch.add(torch.randn(3, 4, 2).double())
    assert s.state is before


def test_reset_and_state_round_trip(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(3))
    s.normalize(torch.randn(5, 3) + 2, Mode.TRAIN)
    state, version = s.export_state()
    assert list(state) == ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    bn = torch.nn.BatchNorm1d(3)
    bn.load_state_dict(state)
    reset, _ = s.reset()
    assert reset.version == version + 1 and reset.num_batches_tracked == 0
    assert reset.running_mean.eq(0).all() and reset.running_var.eq(1).all()
    s.import_state(dict(state), strict=True)
    again, _ = s.export_state()
    for key in state:
        torch.testing.assert_close(again[key], state[key])


def test_import_is_all_or_nothing(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(3))
    before = s.state
    bad = {"running_mean": torch.zeros(3), "running_var": -torch.ones(3)}
    with pytest.raises(InvalidArgument, match=r"running_var.*>= 0"):
        s.import_state(bad, strict=False)
    with pytest.raises(InvalidArgument, match="unexpected key"):
        s.import_state({"gamma": torch.ones(3)}, strict=False)
    with pytest.raises(InvalidArgument, match="missing keys"):
        s.import_state({"running_mean": torch.zeros(3)}, strict=True)
    assert s.state is before


def test_keys_follow_config(manager: SessionManager) -> None:
    s = manager.create(SessionConfig(2, affine=False, track_running_stats=False))
    state, _ = s.export_state()
    assert list(state) == list(
        torch.nn.BatchNorm1d(2, affine=False, track_running_stats=False).state_dict()
    )


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (SessionConfig(0), "config.num_features: must be between 1"),
        (SessionConfig(3, eps=0.0), "config.eps: must be between 1.18e-38"),
        (SessionConfig(3, momentum=1.5), r"config.momentum: must be in \(0, 1\]"),
        (SessionConfig(3, device="tpu"), "config.device: unknown device 'tpu'"),
    ],
)
def test_config_validation(manager: SessionManager, config: SessionConfig, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        manager.create(config)
    assert len(manager) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_cuda_without_cuda_is_failed_precondition(manager: SessionManager) -> None:
    with pytest.raises(FailedPrecondition, match="this server has no CUDA"):
        manager.create(SessionConfig(3, device="cuda"))


def test_manager_ids_and_pages(manager: SessionManager) -> None:
    for i in range(5):
        manager.create(SessionConfig(2), f"s{i}")
    with pytest.raises(AlreadyExists, match="session 's1' already exists"):
        manager.create(SessionConfig(2), "s1")
    with pytest.raises(InvalidArgument, match="session_id: must be 1-128 characters"):
        manager.create(SessionConfig(2), "bad id!")
    page, token = manager.list(page_size=2)
    assert [s.session_id for s in page] == ["s0", "s1"] and token
    manager.delete("s2")  # pages stay consistent while sessions come and go
    page, token = manager.list(page_size=2, page_token=token)
    assert [s.session_id for s in page] == ["s3", "s4"] and not token
    with pytest.raises(InvalidArgument, match="page_token: not a token this server issued"):
        manager.list(page_token="garbage")
    with pytest.raises(NotFound, match="session 'zz' not found"):
        manager.get("zz")


def test_concurrent_train_calls_apply_exactly_once_in_version_order(
    manager: SessionManager,
) -> None:
    s = manager.create(SessionConfig(4, momentum=0.3))
    done: list[tuple[int, torch.Tensor]] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for _ in range(25):
            x = torch.randn(6, 4, 3, generator=g) * (seed + 1)
            v = s.normalize(x, Mode.TRAIN).version
            with lock:
                done.append((v, x))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for v, _ in done) == list(range(2, 2 + 200))
    bn = torch.nn.BatchNorm1d(4, momentum=0.3)
    for _, x in sorted(done, key=lambda item: item[0]):
        bn(x)
    assert s.state.num_batches_tracked == 200
    torch.testing.assert_close(s.state.running_mean, bn.running_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s.state.running_var, bn.running_var, atol=1e-5, rtol=1e-5)


def test_train_calls_compute_outside_the_lock(
    manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TRAIN call's work over the batch runs before it takes the session's lock (calls to one
    session compute in parallel); only the running update waits for it."""
    from normserve.server import ops

    s = manager.create(SessionConfig(4, momentum=0.1))
    computed = threading.Event()
    real = ops.batch_norm_train

    def spy(*args: object, **kwargs: object) -> object:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        computed.set()
        return out

    monkeypatch.setattr(ops, "batch_norm_train", spy)
    x = torch.randn(8, 4, 5) * 3 + 2
    result: list[object] = []
    with s._lock:  # another update holds the session
        t = threading.Thread(target=lambda: result.append(s.normalize(x, Mode.TRAIN)))
        t.start()
        assert computed.wait(30), "the batch was not computed while the lock was held"
        assert not result  # ... and the call waits for the lock to fold it in
    t.join(30)
    bn = torch.nn.BatchNorm1d(4, momentum=0.1)
    torch.testing.assert_close(result[0].output, bn(x), atol=1e-5, rtol=1e-5)  # type: ignore[attr-defined]
    torch.testing.assert_close(s.state.running_var, bn.running_var, atol=1e-5, rtol=1e-5)


def test_an_import_between_compute_and_fold_is_respected(manager: SessionManager) -> None:
    """The batch is computed from a snapshot; if the weights change before the fold (an import),
    the update is computed again from the state it commits to."""
    s = manager.create(SessionConfig(3, momentum=0.5))
    x = torch.randn(6, 3) * 2 + 1
    fold = s.kind.prepare_update(x, s.state, Mode.TRAIN, False)
    assert fold is not None
    w = torch.tensor([2.0, 3.0, 4.0])
    s.import_state({"weight": w}, strict=False)
    step = fold(s.state, s.state.num_batches_tracked + 1)
    bn = torch.nn.BatchNorm1d(3, momentum=0.5)
    with torch.no_grad():
        bn.weight.copy_(w)
    torch.testing.assert_close(step.output, bn(x), atol=1e-5, rtol=1e-5)
    assert step.running is not None
    torch.testing.assert_close(step.running["running_mean"], bn.running_mean)


def test_malloc_tuning_applies_on_glibc() -> None:
    import sys

    from normserve.server._app import tune_malloc

    if sys.platform != "linux":
        pytest.skip("glibc's mallopt is Linux-only")
    assert tune_malloc() is True
