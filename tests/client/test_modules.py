"""RemoteBatchNorm*d against torch.nn.BatchNorm*d: outputs, gradients, state, training; attaching
to sessions that exist; deepcopy, pickle and torch.save."""

from __future__ import annotations

import copy
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
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
    SessionInfo,
    UnavailableError,
)
from tests.grpc._util import serving

CASES = [
    (RemoteBatchNorm1d, nn.BatchNorm1d, (8, 5)),
    (RemoteBatchNorm1d, nn.BatchNorm1d, (8, 5, 7)),
    (RemoteBatchNorm2d, nn.BatchNorm2d, (4, 5, 3, 3)),
    (RemoteBatchNorm3d, nn.BatchNorm3d, (3, 5, 2, 3, 2)),
]


@pytest.mark.parametrize(("remote_cls", "torch_cls", "shape"), CASES)
@pytest.mark.parametrize("track", [True, False])
def test_forward_and_gradients_match(
    client: Client, remote_cls, torch_cls, shape, track: bool
) -> None:
    remote = remote_cls(5, momentum=0.3, track_running_stats=track, client=client)
    ref = torch_cls(5, momentum=0.3, track_running_stats=track)
    with torch.no_grad():
        for m in (remote, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for training in (True, True, False):
        remote.train(training)
        ref.train(training)
        x = (torch.randn(shape) * 3 + 1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = remote(x), ref(x2)
        torch.testing.assert_close(y, y2, atol=1e-5, rtol=1e-5)
        g = torch.randn_like(y)
        y.backward(g)
        y2.backward(g)
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(remote.weight.grad, ref.weight.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(remote.bias.grad, ref.bias.grad, atol=1e-5, rtol=1e-5)
        remote.zero_grad()
        ref.zero_grad()
    assert list(remote.state_dict()) == list(ref.state_dict())
    for key, value in remote.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[key], atol=1e-6, rtol=1e-6)


def test_state_dict_round_trip(client: Client) -> None:
    ref = nn.BatchNorm2d(3)
    ref(torch.randn(4, 3, 2, 2) + 3)
    remote = RemoteBatchNorm2d(3, client=client)
    remote.load_state_dict(ref.state_dict())
    info = client.get_session(remote.session_id)
    torch.testing.assert_close(info.running_mean, ref.running_mean)
    assert info.num_batches_tracked == 1
    back = nn.BatchNorm2d(3)
    back.load_state_dict(remote.state_dict())
    remote.reset_running_stats()
    assert client.get_session(remote.session_id).num_batches_tracked == 0
    with pytest.raises(ValueError, match="expected 4D input"):
        remote(torch.randn(2, 3))


def _net(bn: type, **kw) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), bn(4, **kw), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )


def test_small_network_trains_the_same(client: Client) -> None:
    local = _net(nn.BatchNorm2d)
    remote = _net(RemoteBatchNorm2d, client=client)
    remote.load_state_dict(local.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (local, remote)]
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, 16, 2, 6, 6, generator=g)
    targets = (data.mean(dim=(2, 3, 4)) * 20).long().clamp(-1, 1) + 1  # a learnable labelling
    losses: list[tuple[float, float]] = []
    for step in range(12):
        x, target = data[step % 4], targets[step % 4]
        pair = []
        for model, opt in zip((local, remote), opts, strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append((pair[0], pair[1]))
    for a, b in losses:
        assert abs(a - b) < 1e-4, losses
    assert sum(a for a, _ in losses[-4:]) < sum(a for a, _ in losses[:4])  # it did learn
    for (name, p), (_, q) in zip(local.named_parameters(), remote.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=name)
    local.eval()
    remote.eval()
    x = torch.randn(5, 2, 6, 6)
    torch.testing.assert_close(remote(x), local(x), atol=1e-4, rtol=1e-4)


# ---- attaching to a session that exists


def _stats(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k.endswith(_STAT_KEYS)}


_STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def test_a_second_module_attaches_and_both_see_each_others_updates(client: Client) -> None:
    a = RemoteBatchNorm2d(3, client=client, session_id="shared-bn1")
    b = RemoteBatchNorm2d(3, client=client.target, session_id="shared-bn1")  # another connection
    assert b.session_id == a.session_id == "shared-bn1"
    a(torch.randn(4, 3, 2, 2) + 2)
    assert b.state_dict()["num_batches_tracked"].item() == 1
    b(torch.randn(4, 3, 2, 2) - 1)
    assert a.state_dict()["num_batches_tracked"].item() == 2
    for key, value in _stats(a).items():
        torch.testing.assert_close(value, _stats(b)[key])
    assert [s.session_id for s in client.list_sessions()] == ["shared-bn1"]
    with pytest.raises(AlreadyExistsError, match="'shared-bn1' already exists"):
        RemoteBatchNorm2d(3, client=client, session_id="shared-bn1", if_exists="error")
    with pytest.raises(ValueError, match="if_exists must be 'attach' or 'error', got 'reuse'"):
        RemoteBatchNorm2d(3, client=client, session_id="shared-bn1", if_exists="reuse")  # type: ignore[arg-type]


def test_a_session_whose_config_differs_is_refused_naming_each_field(client: Client) -> None:
    client.create_session(8, session_id="other", eps=1e-3, momentum=None, affine=True)
    with pytest.raises(ValueError) as err:
        RemoteBatchNorm2d(16, client=client, session_id="other")
    assert str(err.value) == (
        f"RemoteBatchNorm2d cannot attach to session 'other' on {client.target}, whose config "
        "differs: num_features is 8 in the session, 16 in the module; eps is 0.001 in the "
        "session, 1e-05 in the module; momentum is None in the session, 0.1 in the module; "
        "affine is True in the session, False in the module (weight and bias are the module's "
        "own parameters: its sessions have none). Use another session_id, delete that session, "
        "or build the module to match it"
    )
    client.create_session(4, session_id="untracked", affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match=r"differs: track_running_stats is False in the session"):
        RemoteBatchNorm1d(4, client=client, session_id="untracked")
    assert RemoteBatchNorm1d(4, client=client, session_id="untracked", track_running_stats=False)
    # another kind with the same numbers is not a batch norm to attach to
    client.create_session(4, session_id="groups", kind="group_norm", num_groups=2, affine=False)
    with pytest.raises(ValueError, match=r"differs: kind is 'group_norm' in the session"):
        RemoteBatchNorm1d(
            4, client=client, session_id="groups", momentum=None, track_running_stats=False
        )


def test_a_restarted_job_finds_its_sessions(client: Client) -> None:
    x = torch.randn(6, 3, 2, 2) * 2 + 1

    def job() -> nn.Sequential:  # what a training script builds, the same on every start
        torch.manual_seed(1)
        return nn.Sequential(
            nn.Conv2d(3, 3, 1), RemoteBatchNorm2d(3, client=client.target, session_id="job-bn1")
        )

    model = job()
    model(x)
    model(x * 2)
    before = _stats(model)
    model.eval()
    out = model(x)
    del model
    model = job()
    assert model[1].session_id == "job-bn1"
    for key, value in _stats(model).items():
        torch.testing.assert_close(value, before[key])
    model.eval()
    torch.testing.assert_close(model(x), out)


def test_of_two_workers_creating_at_once_the_second_attaches(client: Client, monkeypatch) -> None:
    real_get = client.get_session
    looked: list[str] = []

    def get_session(session_id: str, **kw: Any) -> SessionInfo:
        looked.append(session_id)
        if len(looked) == 1:  # not there yet; then the other worker creates it, before we do
            client.create_session(4, session_id=session_id, affine=False)
            raise NotFoundError(grpc.StatusCode.NOT_FOUND, f"session {session_id!r} not found")
        return real_get(session_id, **kw)

    monkeypatch.setattr(client, "get_session", get_session)
    bn = RemoteBatchNorm1d(4, client=client, session_id="raced")
    assert looked == ["raced", "raced"]
    assert bn.session_id == "raced"
    monkeypatch.undo()

    # and for real: eight threads constructing the same module at once
    barrier = threading.Barrier(8)

    def worker(_: int) -> str:
        barrier.wait()
        return RemoteBatchNorm1d(4, client=client, session_id="crowd").session_id

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(worker, range(8))) == ["crowd"] * 8
    assert sorted(s.session_id for s in client.list_sessions()) == ["crowd", "raced"]


# ---- deepcopy forks the session; pickle and torch.save keep a reference


def _model(client: Client | str, **kw: Any) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(nn.Conv2d(2, 3, 1), RemoteBatchNorm2d(3, client=client, **kw))


def test_deepcopy_forks_the_statistics_into_a_new_session(client: Client) -> None:
    model = _model(client)
    model(torch.randn(4, 2, 3, 3) + 1)
    ema = copy.deepcopy(model)
    bn, copied = model[1], ema[1]
    assert copied.session_id != bn.session_id
    assert copied.client is client  # a Client you pass is shared, never copied
    assert client.get_session(copied.session_id).ttl_seconds == (
        client.get_session(bn.session_id).ttl_seconds
    )
    for key, value in _stats(model).items():
        torch.testing.assert_close(value, _stats(ema)[key])
    assert copied.weight is not bn.weight
    torch.testing.assert_close(copied.weight, bn.weight)
    ema(torch.randn(4, 2, 3, 3) - 3)  # training the copy leaves the original alone
    assert _stats(model)["1.num_batches_tracked"].item() == 1
    assert _stats(ema)["1.num_batches_tracked"].item() == 2
    # SWA: torch's AveragedModel deep-copies the model it averages
    swa = torch.optim.swa_utils.AveragedModel(model)
    swa.update_parameters(model)
    swa.eval()
    model.eval()
    x = torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(swa(x), model(x))
    # a module made from a target gets a connection of its own
    owned = RemoteBatchNorm1d(3, client=client.target)
    twin = copy.deepcopy(owned)
    assert twin.client is not owned.client and twin.session_id != owned.session_id
    assert len(client.list_sessions()) == 5


def test_pickling_keeps_a_reference_and_reconnects_on_first_use(client: Client) -> None:
    model = _model(client.target)
    model(torch.randn(4, 2, 3, 3) + 1)
    x = torch.randn(2, 2, 3, 3)
    model.eval()
    out = model(x)
    loaded = pickle.loads(pickle.dumps(model))
    bn = loaded[1]
    assert bn.session_id == model[1].session_id
    assert bn._client is None  # not connected yet
    torch.testing.assert_close(loaded(x), out)
    loaded.train()
    loaded(torch.randn(4, 2, 3, 3))  # the same session: the original sees the update
    assert _stats(model)["1.num_batches_tracked"].item() == 2
    model.load_state_dict(pickle.loads(pickle.dumps(model)).state_dict())
    # a module whose session is gone re-creates it from the statistics its pickle kept
    blob = pickle.dumps(model)
    stats = _stats(model)
    client.delete_session(model[1].session_id)
    back = pickle.loads(blob)
    for key, value in _stats(back).items():
        torch.testing.assert_close(value, stats[key])


def _in_a_new_process(passed: nn.Sequential, checkpoint: str, x: torch.Tensor, out: str) -> None:
    """A spawned child: ``passed`` came pickled (torch.multiprocessing), ``checkpoint`` is a
    torch.save file; both connect on first use."""
    loaded = torch.load(checkpoint, weights_only=False)
    assert passed[1]._client is None and loaded[1]._client is None, "connected before first use"
    loaded.eval()
    passed.eval()
    result = {"loaded": loaded(x), "passed": passed(x), "session": loaded[1].session_id}
    loaded.train()
    loaded(x)  # one more batch, into the same session
    torch.save(result, out)


def test_torch_save_and_load_in_a_new_process(client: Client, tmp_path: Path) -> None:
    model = _model(client.target, session_id="checkpointed")
    model(torch.randn(4, 2, 3, 3) + 1)
    x = torch.randn(2, 2, 3, 3)
    model.eval()
    out = model(x)
    torch.save(model, tmp_path / "model.pt")
    child = torch.multiprocessing.get_context("spawn").Process(
        target=_in_a_new_process,
        args=(model, str(tmp_path / "model.pt"), x, str(tmp_path / "out.pt")),
    )
    child.start()
    child.join(120)
    assert child.exitcode == 0
    result = torch.load(tmp_path / "out.pt")
    assert result["session"] == "checkpointed"
    torch.testing.assert_close(result["loaded"], out)
    torch.testing.assert_close(result["passed"], out)
    assert _stats(model)["1.num_batches_tracked"].item() == 2


def test_a_module_whose_server_is_gone_fails_on_first_use_not_when_loaded(monkeypatch) -> None:
    for name in ("TLS", "CA_FILE", "CERT_FILE", "KEY_FILE", "TOKEN_FILE", "TOKEN"):
        monkeypatch.delenv(f"NORMSERVE_{name}", raising=False)
    with serving() as srv, Client(srv.address, retry=0, timeout=5) as given:
        blob = pickle.dumps(RemoteBatchNorm1d(3, client=given))
    bn = pickle.loads(blob)  # no server, no error
    with pytest.raises(UnavailableError, match=f"is the server running at {srv.address}"):
        bn(torch.randn(4, 3))
    with serving() as srv2, Client(srv2.address) as other:
        bn.connect(other)  # a Client of your own choosing, for a module loaded elsewhere
        assert other.get_session(bn.session_id).num_features == 3
        assert bn(torch.randn(4, 3)).shape == (4, 3)


TOKEN = "alice-token-0123456789abcdef"


def test_a_token_is_never_pickled(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("NORMSERVE_TOKEN", raising=False)
    monkeypatch.delenv("NORMSERVE_TOKEN_FILE", raising=False)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {TOKEN}\n")
    with serving(auth_tokens_file=str(tokens)) as srv:
        bn = RemoteBatchNorm1d(3, client=srv.address, token=TOKEN)
        blob = pickle.dumps(bn)
        assert TOKEN.encode() not in blob
        loaded = pickle.loads(blob)
        with pytest.raises(ValueError) as err:
            loaded(torch.randn(4, 3))
        assert str(err.value) == (
            f"RemoteBatchNorm1d (session {bn.session_id!r} on {srv.address}) was pickled without "
            "its token (a token's value is never pickled): set NORMSERVE_TOKEN_FILE or "
            "NORMSERVE_TOKEN, or construct it with token_file=..., or give it a Client with "
            ".connect(client)"
        )
        monkeypatch.setenv("NORMSERVE_TOKEN", TOKEN)
        assert loaded(torch.randn(4, 3)).shape == (4, 3)
        monkeypatch.delenv("NORMSERVE_TOKEN")
        # a token_file is pickled as its path, and read again on reconnecting
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN + "\n")
        bn = RemoteBatchNorm1d(3, client=srv.address, token_file=str(token_file))
        blob = pickle.dumps(bn)
        assert TOKEN.encode() not in blob and str(token_file).encode() in blob
        assert pickle.loads(blob)(torch.randn(4, 3)).shape == (4, 3)
        # and a deep copy, in this process, keeps using the token it was given
        assert copy.deepcopy(RemoteBatchNorm1d(3, client=srv.address, token=TOKEN)).client
