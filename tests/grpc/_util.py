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


# ---- synchronized sessions


def sync_request(sid: str, x: torch.Tensor, rank: int, step: int) -> pb.NormalizeRequest:
    """A participant's TRAIN batch of a synchronized step, as one Normalize request."""
    return pb.NormalizeRequest(
        session_id=sid,
        mode=pb.MODE_TRAIN,
        input=tensor_to_proto(x),
        sync=pb.SyncStep(rank=rank, step=step),
    )


def sync_chunks(
    sid: str, x: torch.Tensor, rank: int | None, step: int, rows: int = 1
) -> list[pb.NormalizeStreamRequest]:
    """One TRAIN batch as chunk requests of ``rows`` rows each; the first names the sync (none
    with ``rank`` None)."""
    reqs = []
    starts = list(range(0, x.shape[0], rows))
    for i, start in enumerate(starts):
        req = pb.NormalizeStreamRequest(
            chunk=tensor_to_proto(x[start : start + rows]), end_of_batch=i == len(starts) - 1
        )
        if i == 0:
            req.session_id, req.mode = sid, pb.MODE_TRAIN
            if rank is not None:
                req.sync.CopyFrom(pb.SyncStep(rank=rank, step=step))
        reqs.append(req)
    return reqs


def leaving_aborts_the_step(client: Client, sid: str, waiting: Any, leaving: Any) -> None:
    """Cancelling participant 1's call (``leaving``) fails step 0 for the participant still
    waiting on it at once, not at the group's timeout, and nothing is applied."""
    time.sleep(0.3)  # the leaving participant's batch has arrived and waits for the others
    t0 = time.perf_counter()
    leaving.cancel()
    with expect_status(
        grpc.StatusCode.ABORTED,
        f"participant 1 left forward step 0 of session {sid!r} (its call was cancelled); "
        "nothing was applied, send the step again",
    ):
        waiting.result()
    assert time.perf_counter() - t0 < 5  # not the group's 60 s timeout
    assert client.get_session(sid).version == 1
