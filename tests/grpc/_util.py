"""Helpers for transport-level tests: raw messages and state snapshots."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch

from normserve.client import Client
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
