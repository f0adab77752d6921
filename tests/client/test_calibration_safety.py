"""No session is left calibrating, and no applied batch is refused on retry: what a new user's
review of recalibration, freezing and adaptation found (each case failed before its fix)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from normserve.client import (
    AsyncClient,
    Client,
    FailedPreconditionError,
    NotFoundError,
    RemoteBatchNorm1d,
    recalibrate,
)
from normserve.server import Server

C = 3


def _trained(client: Client, sid: str = "") -> str:
    sid = client.create_session(C, session_id=sid).session_id
    for i in range(3):
        client.normalize(sid, torch.randn(8, C, generator=torch.Generator().manual_seed(i)))
    return sid


def test_a_refused_commit_aborts_instead_of_leaving_the_session_calibrating(
    client: Client,
) -> None:
    sid = _trained(client)
    before = client.export_state(sid)
    with pytest.raises(FailedPreconditionError) as err, client.calibration(sid):
        pass  # nothing accumulated: the commit is refused
    assert "calibration was aborted" in "\n".join(getattr(err.value, "__notes__", []))
    assert not client.get_session(sid).calibrating
    after = client.export_state(sid)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # statistics kept
    client.normalize(sid, torch.randn(8, C))  # and TRAIN works again


def test_the_block_s_own_error_survives_a_failed_abort(client: Client) -> None:
    sid = _trained(client)

    class Mine(Exception):
        pass

    with pytest.raises(Mine) as err, client.calibration(sid):
        client.delete_session(sid)  # the abort will find no session
        raise Mine("the caller's error")
    notes = "\n".join(getattr(err.value, "__notes__", []))
    assert "aborting the calibration failed" in notes and "NOT_FOUND" in notes


def test_recalibrate_with_no_batches_aborts_every_layer(client: Client) -> None:
    model = nn.Sequential(RemoteBatchNorm1d(C, client=client), RemoteBatchNorm1d(C, client=client))
    model(torch.randn(8, C))  # sessions exist and have trained once
    with pytest.raises(ValueError, match="no batch reached any remote batch norm layer"):
        recalibrate(model, [])
    with pytest.raises(ValueError, match="no batch reached"):
        recalibrate(model, [torch.randn(8, C)], max_batches=0)
    for layer in model:
        assert not client.get_session(layer.session_id).calibrating  # type: ignore[union-attr]


def test_recalibrate_aborts_a_layer_the_batches_never_reach(client: Client) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = RemoteBatchNorm1d(C, client=client)
            self.aux = RemoteBatchNorm1d(C, client=client)  # an unused head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x)

    net = Net()
    net(torch.randn(8, C))
    net.aux(torch.randn(8, C))
    aux_before = client.get_session(net.aux.session_id)
    xs = [torch.randn(n, C) * 2 + 1 for n in (5, 9, 4)]
    done = recalibrate(net, xs)
    assert set(done) == {"bn"}
    want = torch.cat(xs).double()
    torch.testing.assert_close(done["bn"].running_var.double(), want.var(dim=0), rtol=1e-6, atol=0)  # type: ignore[union-attr]
    aux = client.get_session(net.aux.session_id)
    assert not aux.calibrating
    assert torch.equal(aux.running_mean, aux_before.running_mean)  # type: ignore[arg-type]
    net.train()
    net.aux(torch.randn(8, C))  # trains again


def test_a_failing_commit_names_its_layer_and_aborts_the_rest(client: Client) -> None:
    model = nn.Sequential(RemoteBatchNorm1d(C, client=client), RemoteBatchNorm1d(C, client=client))
    model(torch.randn(8, C))
    first = model[0].session_id  # type: ignore[union-attr]

    def run(m: nn.Module, x: torch.Tensor) -> None:
        m(x)
        client.freeze(first)  # the first layer's commit will be refused

    with pytest.raises(FailedPreconditionError) as err:
        recalibrate(model, [torch.randn(8, C)], run=run)
    assert "recalibrate: layer '0'" in "\n".join(getattr(err.value, "__notes__", []))
    assert not client.get_session(model[1].session_id).calibrating  # type: ignore[union-attr]


def test_adapt_accumulate_without_adapt_is_refused_not_trained(client: Client) -> None:
    sid = _trained(client)
    before = client.get_session(sid)
    with pytest.raises(ValueError, match="adapt_accumulate=True needs adapt="):
        client.normalize(sid, torch.randn(8, C), adapt_accumulate=True)
    with pytest.raises(ValueError, match="adapt_accumulate=True needs adapt="):
        list(client.normalize_stream(sid, [torch.randn(8, C)], adapt_accumulate=True))
    assert client.get_session(sid).version == before.version


@pytest.mark.parametrize("then", ["freeze", "start_calibration"])
def test_a_retry_of_an_applied_train_call_is_replayed_not_refused(
    client: Client, then: str
) -> None:
    sid = _trained(client)
    x = torch.randn(8, C) * 3 + 1
    first = client.normalize(sid, x, idempotency_key="once-only")
    getattr(client, then)(sid)
    again = client.normalize(sid, x, idempotency_key="once-only")
    assert again.replayed and again.version == first.version
    torch.testing.assert_close(again.output, first.output)
    torch.testing.assert_close(again.mean, first.mean)
    with pytest.raises(FailedPreconditionError):  # a new batch is refused as before
        client.normalize(sid, x, idempotency_key="a-new-one")


def test_a_deleted_session_during_recalibration_is_reported(client: Client) -> None:
    model = nn.Sequential(RemoteBatchNorm1d(C, client=client))
    model(torch.randn(8, C))

    def run(m: nn.Module, x: torch.Tensor) -> None:
        m(x)
        client.delete_session(m[0].session_id)  # type: ignore[index]

    with pytest.raises(NotFoundError):
        recalibrate(model, [torch.randn(8, C)], run=run)


def test_the_async_client_refuses_accumulating_without_a_weight(server: Server) -> None:
    async def main() -> None:
        async with AsyncClient(server.address) as ac:
            sid = (await ac.create_session(C)).session_id
            with pytest.raises(ValueError, match="adapt_accumulate=True needs adapt="):
                await ac.normalize(sid, torch.randn(8, C), adapt_accumulate=True)
            with pytest.raises(ValueError, match="adapt_accumulate=True needs adapt="):
                async for _ in ac.normalize_stream(sid, [torch.randn(8, C)], adapt_accumulate=True):
                    pass
            assert (await ac.get_session(sid)).version == 1

    asyncio.run(main())
