"""RemoteLayerNorm, RemoteGroupNorm, RemoteInstanceNorm*d and RemoteRMSNorm against their torch
modules: outputs, gradients (input, weight, bias), state, over random shapes and parameters."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normserve.client import (
    Client,
    RemoteGroupNorm,
    RemoteInstanceNorm1d,
    RemoteInstanceNorm2d,
    RemoteInstanceNorm3d,
    RemoteLayerNorm,
    RemoteRMSNorm,
)
from normserve.server import Server
from tests.grpc._util import serving

TOL = {"atol": 1e-5, "rtol": 1e-5}
INSTANCE = {
    3: (RemoteInstanceNorm1d, nn.InstanceNorm1d),
    4: (RemoteInstanceNorm2d, nn.InstanceNorm2d),
    5: (RemoteInstanceNorm3d, nn.InstanceNorm3d),
}


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server for the module (stopping one costs ~0.5 s)."""
    with serving(workers=16) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


def _pair(kind: str, o: dict[str, Any], client: Client) -> tuple[nn.Module, nn.Module]:
    """(remote, torch) modules of one config."""
    if kind == "layer_norm":
        args = (o["normalized"], o["eps"], o["affine"], o["bias"])
        return RemoteLayerNorm(*args, client=client), nn.LayerNorm(*args)
    if kind == "rms_norm":
        args = (o["normalized"], o["eps"], o["affine"])
        return RemoteRMSNorm(*args, client=client), nn.RMSNorm(*args)
    if kind == "group_norm":
        args = (o["groups"], o["channels"], o["eps"], o["affine"])
        return RemoteGroupNorm(*args, client=client), nn.GroupNorm(*args)
    remote_cls, torch_cls = INSTANCE[len(o["spatial"]) + 2]
    args = (o["channels"], o["eps"], o["momentum"], o["affine"], o["track"])
    return remote_cls(*args, client=client), torch_cls(*args)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["layer_norm", "group_norm", "instance_norm", "rms_norm"]))
    o: dict[str, Any] = {
        "eps": draw(st.sampled_from([1e-5, 1e-3] + ([None] if kind == "rms_norm" else []))),
        "affine": draw(st.booleans()),
    }
    if kind in ("layer_norm", "rms_norm"):
        normalized = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        if math.prod(normalized) < 8:
            normalized = [*normalized, 8]
        o["normalized"] = normalized
        o["bias"] = draw(st.booleans())
        o["tail"] = [*draw(st.lists(st.integers(1, 3), max_size=2)), *normalized]
    else:
        rank = draw(st.sampled_from([3, 4, 5]) if kind == "instance_norm" else st.integers(2, 5))
        spatial = draw(st.lists(st.integers(1, 3), min_size=rank - 2, max_size=rank - 2))
        groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        per_stat = (per_group if kind == "group_norm" else 1) * math.prod(spatial)
        if per_stat < 8:  # well conditioned: no variance tiny next to eps
            spatial = [*spatial[:-1], spatial[-1] * -(-8 // per_stat)] if spatial else [8]
        o.update(spatial=spatial, groups=groups, channels=groups * per_group)
        o["momentum"] = draw(st.one_of(st.none(), st.floats(0.01, 1.0)))
        o["track"] = draw(st.booleans())
        o["tail"] = [o["channels"], *spatial]
    return {
        "kind": kind,
        "options": o,
        "steps": draw(st.lists(st.booleans(), min_size=2, max_size=4)),  # training?
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _same_parameters(remote: nn.Module, ref: nn.Module, g: torch.Generator) -> None:
    assert [n for n, _ in remote.named_parameters()] == [n for n, _ in ref.named_parameters()]
    with torch.no_grad():
        for (_, p), (_, q) in zip(remote.named_parameters(), ref.named_parameters(), strict=True):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            q.copy_(p)


def _step(remote: nn.Module, ref: nn.Module, x: torch.Tensor, g: torch.Generator) -> None:
    """One forward and backward through both; outputs and every gradient agree."""
    x1 = x.clone().requires_grad_()
    x2 = x.clone().requires_grad_()
    y1, y2 = remote(x1), ref(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    grad = torch.randn(y1.shape, generator=g)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    for (name, p), (_, q) in zip(remote.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    remote.zero_grad()
    ref.zero_grad()


@settings(max_examples=40, deadline=None)
@given(sc=configs())
def test_forward_and_gradients_match_torch(client: Client, sc: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(sc["seed"])
    remote, ref = _pair(sc["kind"], sc["options"], client)
    _same_parameters(remote, ref, g)
    for training in sc["steps"]:
        remote.train(training)
        ref.train(training)
        n = int(torch.randint(1, 5, (1,), generator=g))
        x = torch.randn([n, *sc["options"]["tail"]], generator=g) * 2 + 1
        _step(remote, ref, x, g)
    assert list(remote.state_dict()) == list(ref.state_dict())
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(remote.state_dict()[key], value, **TOL)
    remote.delete_session()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("remote", "ref", "shape"),
    [
        (lambda c: RemoteLayerNorm([3, 4], client=c), lambda: nn.LayerNorm([3, 4]), [3, 4]),
        (lambda c: RemoteRMSNorm(6, client=c), lambda: nn.RMSNorm(6), [6]),
        (
            lambda c: RemoteInstanceNorm1d(3, affine=True, client=c),
            lambda: nn.InstanceNorm1d(3, affine=True),
            [3, 8],
        ),
        (
            lambda c: RemoteInstanceNorm2d(2, affine=True, track_running_stats=True, client=c),
            lambda: nn.InstanceNorm2d(2, affine=True, track_running_stats=True),
            [2, 3, 3],
        ),
        (lambda c: RemoteInstanceNorm3d(2, client=c), lambda: nn.InstanceNorm3d(2), [2, 2, 2, 2]),
    ],
)
def test_unbatched_inputs_as_torch_takes_them(client: Client, remote, ref, shape) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(2)
    r, t = remote(client), ref()
    _same_parameters(r, t, g)
    for training in (True, False):
        r.train(training)
        t.train(training)
        _step(r, t, torch.randn(shape, generator=g) * 2 + 1, g)


def test_instance_norm_state_dict_round_trip(client: Client) -> None:
    ref = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    ref(torch.randn(4, 3, 2, 2) + 3)
    remote = RemoteInstanceNorm2d(3, affine=True, track_running_stats=True, client=client)
    remote.load_state_dict(ref.state_dict())
    info = client.get_session(remote.session_id)
    torch.testing.assert_close(info.running_mean, ref.running_mean)
    back = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    back.load_state_dict(remote.state_dict())
    torch.testing.assert_close(back.running_var, ref.running_var)
    remote.reset_running_stats()
    assert torch.equal(client.get_session(remote.session_id).running_mean, torch.zeros(3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected 3D or 4D input \(got 2D input\)"):
        remote(torch.randn(2, 3))
    # modules without running statistics keep only their parameters, as torch's do
    layer = RemoteLayerNorm(4, client=client)
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer.load_state_dict(nn.LayerNorm(4).state_dict())


def test_a_small_network_trains_the_same(client: Client) -> None:
    def net(group: type, layer: type, **kw: Any) -> nn.Sequential:
        torch.manual_seed(3)
        return nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            group(2, 4, **kw),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 8),
            layer(8, **kw),
            nn.Linear(8, 3),
        )

    local = net(nn.GroupNorm, nn.LayerNorm)
    remote = net(RemoteGroupNorm, RemoteLayerNorm, client=client)
    remote.load_state_dict(local.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (local, remote)]
    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, 8, 2, 6, 6, generator=g)
    targets = (data.mean(dim=(2, 3, 4)) * 20).long().clamp(-1, 1) + 1
    for step in range(8):
        x, target = data[step % 4], targets[step % 4]
        losses = []
        for model, opt in zip((local, remote), opts, strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), target)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-4, losses
    for (name, p), (_, q) in zip(local.named_parameters(), remote.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=name)
