"""RemoteBatchNorm*d against torch.nn.BatchNorm*d: outputs, gradients, state, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normserve.client import Client, RemoteBatchNorm1d, RemoteBatchNorm2d, RemoteBatchNorm3d

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
