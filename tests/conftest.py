"""Shared fixtures: a real in-process server on a free loopback port, and clients for it."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import grpc
import pytest
import torch

from normserve.client import Client
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from tests import _redis

torch.manual_seed(0)


@pytest.fixture
def server() -> Iterator[Server]:
    srv = start_server(
        Settings(address="127.0.0.1:0", metrics_address="127.0.0.1:0", device="cpu", workers=16)
    )
    yield srv
    srv.stop(0)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.address, timeout=30) as c:
        yield c


@pytest.fixture
def stub(server: Server) -> Iterator[pb_grpc.NormalizerStub]:
    """The raw generated stub, for sending what the client would never send."""
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.NormalizerStub(channel)
    channel.close()


def has_cuda() -> bool:
    return torch.cuda.is_available()


@pytest.fixture
def redis_server(tmp_path: pathlib.Path) -> Iterator[_redis.RedisServer]:
    """A real redis-server (AOF on, ``appendfsync always``) on a free loopback port, its data in
    a temporary directory; ``kill()`` and ``restart()`` it to test what survives. Skipped without
    redis-server, failed in CI (see tests/_redis.py)."""
    with _redis.RedisServer(tmp_path / "redis") as srv:
        yield srv
