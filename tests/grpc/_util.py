"""Helpers for transport-level tests: raw messages and state snapshots."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from normserve.client import Client
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2 as pb
from normserve.wire import tensor_to_proto


def tensor(x: torch.Tensor) -> pb.Tensor:
    return tensor_to_proto(x)


def raw_tensor(dtype: int, shape: list[int], data: bytes) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=shape, data=data)  # type: ignore[arg-type]


@contextmanager
def unchanged(client: Client, session_id: str) -> Iterator[None]:
    """Asserts the session's state and version are the same after the block."""
    before = client.get_session(session_id)
    state = client.export_state(session_id)
    yield
    after = client.get_session(session_id)
    assert after.version == before.version
    assert after.num_batches_tracked == before.num_batches_tracked
    for key, value in client.export_state(session_id).items():
        assert torch.equal(value, state[key]), key


def expect_status(code: grpc.StatusCode, message: str) -> pytest.RaisesExc:  # type: ignore[name-defined]
    """pytest.raises for an RpcError with exactly this code and message."""
    return _Expect(code, message)  # type: ignore[return-value]


class _Expect:
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code, self.message = code, message

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type | None, exc: BaseException | None, tb: object) -> bool:
        assert exc is not None, f"expected {self.code.name}, the call succeeded"
        assert isinstance(exc, grpc.RpcError), exc
        assert exc.code() == self.code, (exc.code(), exc.details())
        assert exc.details() == self.message, exc.details()
        return True


def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Polls ``condition`` until it holds or ``timeout`` passes; returns whether it held. The
    server records a call (metrics, logs) as it ends, which may be just after the client has
    its answer."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value (0 when absent)."""
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def settled(registry: CollectorRegistry, name: str, want: float, **labels: str) -> float:
    """The sample's value once it equals ``want``, or its value after 5 s of waiting."""
    until(lambda: metric(registry, name, **labels) == want)
    return metric(registry, name, **labels)


@contextmanager
def serving(registry: CollectorRegistry | None = None, **settings: Any) -> Iterator[Server]:
    """A real server on a free loopback port with these settings, stopped afterwards."""
    srv = start_server(
        Settings(address="127.0.0.1:0", metrics_address="off", device="cpu", **settings), registry
    )
    try:
        yield srv
    finally:
        srv.stop(0)
