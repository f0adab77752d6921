"""The sync and asyncio clients: same methods, same results, the project's own errors."""

from __future__ import annotations

import asyncio
import inspect
import time

import grpc
import numpy as np
import pytest
import torch

from normserve.client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    NormserveError,
    NotFoundError,
    UnavailableError,
)
from normserve.server import Server

# The README's list of the methods both clients have.
README_METHODS = {
    "create_session",
    "get_session",
    "list_sessions",
    "delete_session",
    "reset_session",
    "export_state",
    "import_state",
    "normalize",
    "normalize_stream",
    "sync_reduce",
    "health",
}


def _public_methods(cls: type) -> set[str]:
    return {n for n, _ in inspect.getmembers(cls, inspect.isfunction) if not n.startswith("_")}


def _parameters(func: object) -> list[tuple[str, object, object, object]]:
    """Name, kind, default and annotation of each parameter. Each client module has its own
    ``object()`` sentinel for "the client's default timeout": those compare as one value."""

    def default(value: object) -> object:
        return "<client default>" if type(value) is object else value

    return [
        (p.name, p.kind, default(p.default), p.annotation)
        for p in inspect.signature(func).parameters.values()  # type: ignore[arg-type]
    ]


def test_sync_and_async_clients_have_the_same_methods() -> None:
    assert _public_methods(Client) == _public_methods(AsyncClient)
    assert README_METHODS | {"close"} <= _public_methods(Client)


@pytest.mark.parametrize("name", sorted(_public_methods(Client)))
def test_sync_and_async_signatures_match(name: str) -> None:
    """Same parameters, kinds, defaults and annotations; only the return type differs (awaitable,
    or an async iterator for ``normalize_stream``)."""
    sync, aio = getattr(Client, name), getattr(AsyncClient, name)
    assert _parameters(sync) == _parameters(aio)
    if name == "normalize_stream":
        assert inspect.isasyncgenfunction(aio) and not inspect.isasyncgenfunction(sync)
    elif name == "calibration":  # a context manager: ``async with`` on one, ``with`` on the other
        assert inspect.isasyncgenfunction(aio.__wrapped__)
        assert inspect.isgeneratorfunction(sync.__wrapped__)
    else:
        assert inspect.iscoroutinefunction(aio) and not inspect.iscoroutinefunction(sync)


def test_signature_comparison_sees_a_parameter_added_to_one_client() -> None:
    sig = inspect.signature(Client.get_session)
    extra = inspect.Parameter("extra", inspect.Parameter.KEYWORD_ONLY, default=0)

    def widened() -> None: ...

    widened.__signature__ = sig  # type: ignore[attr-defined]
    assert _parameters(widened) == _parameters(AsyncClient.get_session)
    widened.__signature__ = sig.replace(parameters=[*sig.parameters.values(), extra])  # type: ignore[attr-defined]
    assert _parameters(widened) != _parameters(AsyncClient.get_session)


def test_numpy_in_numpy_out(client: Client) -> None:
    sid = client.create_session(3).session_id
    x = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float32)
    r = client.normalize(sid, x)
    assert isinstance(r.output, np.ndarray) and r.output.dtype == np.float32
    ref = torch.nn.BatchNorm1d(3)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(r.output, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_round_trip(client: Client, dtype: torch.dtype) -> None:
    sid = client.create_session(4).session_id
    x = torch.randn(8, 4, 3).to(dtype)
    r = client.normalize(sid, x)
    assert r.output.dtype == dtype and r.mean.dtype == torch.float32
    bn = torch.nn.BatchNorm1d(4)
    if dtype == torch.float64:
        bn = bn.double()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(r.output, bn(x).detach(), atol=tol, rtol=tol)


def test_errors_are_normserve_errors(client: Client) -> None:
    with pytest.raises(NotFoundError) as info:
        client.get_session("nope")
    assert info.value.code is grpc.StatusCode.NOT_FOUND
    assert info.value.message == "session 'nope' not found"
    assert not isinstance(info.value, grpc.RpcError)
    sid = client.create_session(2).session_id
    with pytest.raises(InvalidArgumentError, match=r"input.shape\[1\]: expected 2 channels"):
        client.normalize(sid, torch.randn(3, 5))
    with pytest.raises(InvalidArgumentError, match=r"chunk.shape\[1\]: expected 2 channels"):
        list(client.normalize_stream(sid, [torch.randn(3, 5)]))


def test_mistakes_are_named_in_the_callers_terms(client: Client) -> None:
    # a wrong keyword names the public method, not an internal helper
    with pytest.raises(TypeError, match=r"create_session\(\) got an unexpected keyword .*'id'"):
        client.create_session(8, id="x")  # type: ignore[call-arg]
    sid = client.create_session(2, session_id="named").session_id
    assert sid == "named"
    # a dtype the server would refuse is refused here, with the dtypes it accepts
    for bad in (torch.ones(4, 2, dtype=torch.int64), np.ones((4, 2), dtype=np.int32)):
        with pytest.raises(
            TypeError, match="a batch must be float32, float16, bfloat16 or float64"
        ):
            client.normalize(sid, bad)
        with pytest.raises(TypeError, match="a batch must be float32"):
            list(client.normalize_stream(sid, [bad]))
    assert client.get_session(sid).version == 1  # nothing reached the session
    # on a stream, the batches before the bad one are answered, then its error is raised
    answered = []
    with pytest.raises(TypeError, match="cannot normalize int64 data"):
        for r in client.normalize_stream(sid, [torch.randn(4, 2), torch.ones(4, 2).long()]):
            answered.append(r.version)
    assert answered == [2] and client.get_session(sid).version == 2


def test_session_info_reads_without_torch_until_asked(client: Client) -> None:
    info = client.create_session(3, momentum=None)
    assert info.to_dict()["running_var"] == [1.0, 1.0, 1.0]  # decoded without torch
    assert info.running_var is not None and info.running_var.dtype == torch.float32
    assert info.running_var is info.running_var  # decoded once
    listed = client.list_sessions()[0]
    assert listed.running_mean is None and listed.to_dict()["running_mean"] is None


def test_unreachable_server_says_what_to_check() -> None:
    with Client("127.0.0.1:1", timeout=2) as c, pytest.raises(UnavailableError) as info:
        c.list_sessions()
    assert info.value.hint.startswith("is the server running at 127.0.0.1:1?")
    assert str(info.value).endswith(f"({info.value.hint})")


def test_per_call_timeout(client: Client) -> None:
    sid = client.create_session(2).session_id

    def slow():  # the server waits for a batch that arrives after the deadline
        time.sleep(1.0)
        yield torch.randn(4, 2)

    with pytest.raises(DeadlineExceededError):
        list(client.normalize_stream(sid, slow(), timeout=0.2))
    assert client.get_session(sid).num_batches_tracked == 0


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=2) as c, pytest.raises(UnavailableError):
        c.list_sessions()


def test_async_client_matches_sync(server: Server, client: Client) -> None:
    x = torch.randn(40, 3, 64, 64)  # 1.9 MB: streamed in chunks by both clients

    async def run() -> tuple[torch.Tensor, int, list[int]]:
        async with AsyncClient(server.address) as ac:
            sid = (await ac.create_session(3, session_id="aio")).session_id
            r = await ac.normalize(sid, x)
            versions = [res.version async for res in ac.normalize_stream(sid, [x[:4], x[4:9]])]
            with pytest.raises(NotFoundError, match="session 'zz' not found"):
                await ac.get_session("zz")
            assert await ac.health() == "SERVING"
            return r.output, (await ac.get_session(sid)).num_batches_tracked, versions

    out, batches, versions = asyncio.run(run())
    sid = client.create_session(3).session_id
    torch.testing.assert_close(out, client.normalize(sid, x).output)
    assert batches == 3 and versions == [3, 4]


def test_base_error_carries_code() -> None:
    err = NormserveError(grpc.StatusCode.INTERNAL, "boom")
    assert str(err) == "INTERNAL: boom"
