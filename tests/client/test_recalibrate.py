"""``recalibrate(model, batches)``: a model's remote batch norm layers get exact population
statistics of their inputs (the activations of a training-mode pass), or keep theirs on failure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normserve.client import Client, RemoteBatchNorm2d, recalibrate
from normserve.server import Server

C = 3


def _models(client: Client) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    conv1, conv2 = nn.Conv2d(2, C, 3, padding=1), nn.Conv2d(C, C, 3, padding=1)
    local = nn.Sequential(conv1, nn.BatchNorm2d(C), nn.ReLU(), conv2, nn.BatchNorm2d(C))
    remote = nn.Sequential(
        conv1,
        RemoteBatchNorm2d(C, client=client),
        nn.ReLU(),
        conv2,
        RemoteBatchNorm2d(C, client=client),
    )
    return local, remote


def _population_of_inputs(local: nn.Module, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each BatchNorm2d's input over all batches (a training-mode pass normalizes with the
    batch's statistics, as a calibration pass does), concatenated, as float64 [C, values]."""
    seen: dict[int, list[torch.Tensor]] = {1: [], 4: []}
    hooks = [
        local[i].register_forward_pre_hook(
            lambda m, args, i=i: seen[i].append(args[0].detach().double())
        )
        for i in seen
    ]
    local.train()
    with torch.no_grad():
        for x in batches:
            local(x)
    for h in hooks:
        h.remove()
    return [torch.cat([t.transpose(0, 1).reshape(C, -1) for t in seen[i]], 1) for i in seen]


def test_recalibrate_installs_the_population_statistics_of_each_layer(server: Server) -> None:
    with Client(server.address) as client:
        local, remote = _models(client)
        g = torch.Generator().manual_seed(1)
        batches = [torch.randn(n, 2, 5, 5, generator=g) * 2 + 1 for n in (4, 9, 6)]
        loader = [(x, torch.zeros(len(x))) for x in batches]  # (input, target) pairs
        infos = recalibrate(remote, loader)
        assert sorted(infos) == ["1", "4"]
        for name, flat in zip(("1", "4"), _population_of_inputs(local, batches), strict=True):
            info = infos[name]
            assert not info.calibrating
            torch.testing.assert_close(
                info.running_mean.double(), flat.mean(1), rtol=1e-5, atol=1e-6
            )
            torch.testing.assert_close(info.running_var.double(), flat.var(1), rtol=1e-5, atol=1e-6)
        # the layers' own forward is back: a training step updates the statistics again
        remote.train()
        remote(batches[0])
        assert client.get_session(remote[1].session_id).num_batches_tracked == 1


def test_a_failure_aborts_every_calibration(server: Server) -> None:
    with Client(server.address) as client:
        _, remote = _models(client)
        remote(torch.randn(4, 2, 5, 5))  # a first session state to keep
        before = {i: client.export_state(remote[i].session_id) for i in (1, 4)}

        def batches() -> object:
            yield torch.randn(4, 2, 5, 5)
            raise RuntimeError("loader broke")

        with pytest.raises(RuntimeError, match="loader broke"):
            recalibrate(remote, batches())
        for i in (1, 4):
            info = client.get_session(remote[i].session_id)
            assert not info.calibrating
            for key, value in client.export_state(remote[i].session_id).items():
                assert torch.equal(value, before[i][key]), key
        with pytest.raises(ValueError, match="no remote batch norm layer"):
            recalibrate(nn.Sequential(nn.ReLU()), [torch.randn(2, 2)])
