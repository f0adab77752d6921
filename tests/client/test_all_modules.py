"""Every remote module, one by one: attaching to a session that exists (with the config check),
deepcopy (a fork), pickle and torch.save (a reference, reconnected on first use, re-created if
gone), state_dict, reset, repr and delete; copies still match torch's modules and the original."""

from __future__ import annotations

import copy
import io
import pickle
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from normserve.client import (
    AlreadyExistsError,
    Client,
    NotFoundError,
    RemoteBatchNorm1d,
    RemoteBatchNorm2d,
    RemoteBatchNorm3d,
    RemoteBatchRenorm2d,
    RemoteGhostBatchNorm1d,
    RemoteGroupNorm,
    RemoteInstanceNorm1d,
    RemoteInstanceNorm2d,
    RemoteInstanceNorm3d,
    RemoteLayerNorm,
    RemoteRecurrentBatchNorm1d,
    RemoteRMSNorm,
    RemoteSyncBatchNorm1d,
)
from normserve.server import Server
from tests.grpc._util import serving

_STATS = ("running_mean", "running_var", "num_batches_tracked")
# what a fork keeps of its original's session config (a synchronized one's fork is not: see below)
_CONFIG = ("kind", "num_features", "eps", "momentum", "affine", "track_running_stats")
_CONFIG += ("normalized_shape", "num_groups", "renorm", "ghost_batch_size", "time_steps")


@dataclass(frozen=True)
class Case:
    make: Callable[..., nn.Module]  # (client, **remote options) -> a module
    shape: tuple[int, ...]
    tracks: bool = False  # keeps running statistics
    ref: Callable[[], nn.Module] | None = None  # torch's module of the same config

    def __call__(self, client: Client | str, **kw: Any) -> Any:
        return self.make(client=client, **kw)


CASES = {
    "layer": Case(
        lambda **k: RemoteLayerNorm([3, 4], **k), (4, 3, 4), ref=lambda: nn.LayerNorm([3, 4])
    ),
    "rms": Case(lambda **k: RemoteRMSNorm(6, **k), (2, 3, 6), ref=lambda: nn.RMSNorm(6)),
    "group": Case(
        lambda **k: RemoteGroupNorm(2, 4, **k), (3, 4, 5), ref=lambda: nn.GroupNorm(2, 4)
    ),
    "instance1d": Case(
        lambda **k: RemoteInstanceNorm1d(3, affine=True, **k),
        (2, 3, 8),
        ref=lambda: nn.InstanceNorm1d(3, affine=True),
    ),
    "instance2d-tracked": Case(
        lambda **k: RemoteInstanceNorm2d(3, affine=True, track_running_stats=True, **k),
        (2, 3, 4, 4),
        tracks=True,
        ref=lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
    ),
    "instance3d": Case(
        lambda **k: RemoteInstanceNorm3d(2, **k), (2, 2, 3, 3, 3), ref=lambda: nn.InstanceNorm3d(2)
    ),
    "batch1d": Case(
        lambda **k: RemoteBatchNorm1d(3, **k), (8, 3), tracks=True, ref=lambda: nn.BatchNorm1d(3)
    ),
    "batch2d-untracked": Case(
        lambda **k: RemoteBatchNorm2d(3, track_running_stats=False, **k),
        (4, 3, 2, 2),
        ref=lambda: nn.BatchNorm2d(3, track_running_stats=False),
    ),
    "batch3d": Case(
        lambda **k: RemoteBatchNorm3d(3, **k),
        (3, 3, 2, 2, 2),
        tracks=True,
        ref=lambda: nn.BatchNorm3d(3),
    ),
    "renorm": Case(lambda **k: RemoteBatchRenorm2d(3, rmax=2.0, **k), (4, 3, 2, 2), tracks=True),
    "ghost": Case(lambda **k: RemoteGhostBatchNorm1d(3, ghost_batch_size=2, **k), (6, 3), True),
    "recurrent": Case(lambda **k: RemoteRecurrentBatchNorm1d(3, 2, **k), (6, 3), tracks=True),
    # rank 0 of 2: it trains in step with rank 1 only, so these tests run it in eval mode
    "sync": Case(
        lambda **k: RemoteSyncBatchNorm1d(3, rank=0, world_size=2, **k), (6, 3), tracks=True
    ),
}
ALL = pytest.mark.parametrize("name", list(CASES))
WITH_TORCH = pytest.mark.parametrize("name", [n for n, c in CASES.items() if c.ref is not None])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with serving(workers=8) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


def _randomize(module: nn.Module, case: Case, seed: int = 0) -> None:
    """Parameters, and running statistics where the kind keeps them, far from their defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    if case.tracks:
        state = module.state_dict()
        state["running_mean"] = torch.randn(state["running_mean"].shape, generator=g)
        state["running_var"] = torch.rand(state["running_var"].shape, generator=g) + 0.5
        state["num_batches_tracked"] = torch.tensor(5)
        module.load_state_dict(state)


def _stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k.endswith(_STATS)}


def _same(a: nn.Module, b: nn.Module, x: torch.Tensor, **tol: float) -> None:
    """One forward and backward through both: outputs and every gradient agree."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    torch.testing.assert_close(ya, yb, **tol)
    dy = torch.randn(ya.shape, generator=torch.Generator().manual_seed(7))
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)
        p.grad = q.grad = None


def _input(case: Case) -> torch.Tensor:
    return torch.randn(case.shape, generator=torch.Generator().manual_seed(3)) * 2 + 1


@ALL
def test_a_second_module_attaches_once_the_config_matches(client: Client, name: str) -> None:
    case, sid = CASES[name], f"attach-{name}"
    a = case(client, session_id=sid)
    b = case(client.target, session_id=sid)  # another connection, the same session
    assert a.session_id == b.session_id == sid
    _randomize(a, case)
    assert _stats(b).keys() == _stats(a).keys() == ({*_STATS} if case.tracks else set())
    for key, value in _stats(a).items():
        torch.testing.assert_close(_stats(b)[key], value)
    with pytest.raises(AlreadyExistsError, match=f"'{sid}' already exists"):
        case(client, session_id=sid, if_exists="error")
    differs = f"differs: eps is {a.eps!r} in the session, 0.001 in the module. "
    with pytest.raises(ValueError, match=re.escape(differs)):
        case(client, session_id=sid, eps=1e-3)
    with pytest.raises(ValueError, match="if_exists must be 'attach' or 'error', got 'reuse'"):
        case(client, session_id=sid, if_exists="reuse")
    assert [s.session_id for s in client.list_sessions() if s.session_id == sid] == [sid]
    a.delete_session()
    with pytest.raises(NotFoundError):
        client.get_session(sid)
    b.client.close()


@ALL
def test_deepcopy_forks_the_session_with_its_config_and_statistics(
    client: Client, name: str
) -> None:
    case, x = CASES[name], _input(CASES[name])
    module = case(client)
    _randomize(module, case)
    module.eval()
    fork = copy.deepcopy(module)
    assert fork.session_id != module.session_id
    assert fork.client is client  # a Client you pass is shared, never copied
    assert repr(fork) == repr(module).replace(repr(module.session_id), repr(fork.session_id))
    mine, its = client.get_session(module.session_id), client.get_session(fork.session_id)
    assert {k: getattr(its, k) for k in _CONFIG} == {k: getattr(mine, k) for k in _CONFIG}
    assert its.sync_participants == 0  # a synchronized module's copy is evaluated, not in step
    assert its.ttl_seconds == mine.ttl_seconds
    for key, value in _stats(module).items():
        torch.testing.assert_close(_stats(fork)[key], value)
    for (_, p), (_, q) in zip(module.named_parameters(), fork.named_parameters(), strict=True):
        assert p is not q and torch.equal(p, q)
    _same(fork, module, x)
    before = _stats(module)
    fork.train()
    fork(x)  # training the copy leaves the original alone
    for key, value in _stats(module).items():
        assert torch.equal(value, before[key]), key
    if case.tracks:  # and moves its own
        assert not torch.equal(_stats(fork)["running_mean"], before["running_mean"])
    fork.delete_session()
    module.delete_session()


@ALL
def test_pickle_and_torch_save_keep_a_reference_that_reconnects(client: Client, name: str) -> None:
    case, x = CASES[name], _input(CASES[name])
    module = case(client.target)
    _randomize(module, case)
    module.eval()
    blob = pickle.dumps(module)
    loaded = pickle.loads(blob)
    assert loaded._client is None  # not connected yet
    assert loaded.session_id == module.session_id and repr(loaded) == repr(module)
    _same(loaded, module, x)
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    assert saved._client is None
    _same(saved, module, x)
    # the session is gone: the module re-creates it under its id, from the statistics it kept
    stats = _stats(module)
    client.delete_session(module.session_id)
    back = pickle.loads(blob)
    _same(back, loaded, x)
    assert back.session_id == module.session_id
    assert client.get_session(back.session_id).kind == client.get_session(loaded.session_id).kind
    for key, value in _stats(back).items():
        torch.testing.assert_close(value, stats[key])
    back.delete_session()
    for m in (module, loaded, saved):
        m.client.close()


@ALL
def test_reset_parameters_and_running_statistics(client: Client, name: str) -> None:
    case = CASES[name]
    module = case(client)
    _randomize(module, case)
    module.reset_parameters()
    for pname, p in module.named_parameters():
        assert torch.equal(p, torch.full_like(p, 1.0 if pname == "weight" else 0.0)), pname
    if case.tracks:
        stats = _stats(module)
        assert stats["num_batches_tracked"].item() == 0
        assert torch.equal(stats["running_mean"], torch.zeros_like(stats["running_mean"]))
    module.delete_session()


@WITH_TORCH
def test_copies_still_match_torch(client: Client, name: str) -> None:
    """A deep copy and an unpickled copy train and evaluate as torch's module does."""
    case, x = CASES[name], _input(CASES[name])
    assert case.ref is not None
    module = case(client)
    _randomize(module, case)
    ref = case.ref()
    ref.load_state_dict(module.state_dict())
    for copied in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        twin = copy.deepcopy(ref)
        for training in (True, True, False):
            copied.train(training)
            twin.train(training)
            _same(copied, twin, x * (2 if training else 1), atol=1e-5, rtol=1e-5)
        assert list(copied.state_dict()) == list(twin.state_dict())
        for key, value in twin.state_dict().items():
            torch.testing.assert_close(copied.state_dict()[key], value, atol=1e-5, rtol=1e-5)
