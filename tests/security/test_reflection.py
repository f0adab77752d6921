"""Server reflection: grpc.reflection.v1 as well as v1alpha, v1 able to describe itself, and
reflection only for authenticated callers when the server has tokens (health stays open)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from tests.grpc._util import serving

V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
SERVICES = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
    "normserve.v1.Normalizer",
]
TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def channel() -> Iterator[grpc.Channel]:
    with serving() as srv, grpc.insecure_channel(srv.address) as ch:
        yield ch


def ask_v1_raw(channel: grpc.Channel, *requests: v1alpha.ServerReflectionRequest) -> list[bytes]:
    """v1, called with bytes: what a v1 client sends and receives."""
    call = channel.stream_stream(V1)
    return list(call(iter([r.SerializeToString() for r in requests]), timeout=10))


def file_descriptors(response: v1alpha.ServerReflectionResponse) -> list[Any]:
    out = []
    for raw in response.file_descriptor_response.file_descriptor_proto:
        fdp = descriptor_pb2.FileDescriptorProto()
        fdp.ParseFromString(raw)
        out.append(fdp)
    return out


def test_v1alpha_lists_the_services(channel: grpc.Channel) -> None:
    stub = v1alpha_grpc.ServerReflectionStub(channel)
    request = v1alpha.ServerReflectionRequest(list_services="")
    [response] = stub.ServerReflectionInfo(iter([request]), timeout=10)
    assert [s.name for s in response.list_services_response.service] == SERVICES


def test_v1_answers_the_same_bytes_as_v1alpha(channel: grpc.Channel) -> None:
    requests = [
        v1alpha.ServerReflectionRequest(list_services=""),
        v1alpha.ServerReflectionRequest(file_containing_symbol="normserve.v1.Normalizer"),
        v1alpha.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
    ]
    v1 = ask_v1_raw(channel, *requests)
    stub = v1alpha_grpc.ServerReflectionStub(channel)
    old = [r.SerializeToString() for r in stub.ServerReflectionInfo(iter(requests), timeout=10)]
    assert v1 == old
    listed, normalizer, missing = (v1alpha.ServerReflectionResponse.FromString(r) for r in v1)
    assert [s.name for s in listed.list_services_response.service] == SERVICES
    [fdp] = [f for f in file_descriptors(normalizer) if f.package == "normserve.v1"]
    assert "Normalizer" in [s.name for s in fdp.service]
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _v1_classes(channel: grpc.Channel) -> tuple[Callable[..., Any], Any]:
    """v1's request and response classes, built from what the server says of v1 itself."""
    ask = v1alpha.ServerReflectionRequest(
        file_containing_symbol="grpc.reflection.v1.ServerReflection"
    )
    [raw] = ask_v1_raw(channel, ask)
    [fdp] = file_descriptors(v1alpha.ServerReflectionResponse.FromString(raw))
    assert (fdp.name, fdp.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert [m.name for m in fdp.service[0].method] == ["ServerReflectionInfo"]
    assert not fdp.options.deprecated  # v1alpha's file is; v1's is not
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    get = message_factory.GetMessageClass
    request = get(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest"))
    response = get(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse"))
    return request, response


def test_v1_describes_itself_and_answers_in_its_own_types(channel: grpc.Channel) -> None:
    request, response = _v1_classes(channel)
    call = channel.stream_stream(
        V1, request_serializer=request.SerializeToString, response_deserializer=response.FromString
    )
    [listed] = call(iter([request(list_services="")]), timeout=10)
    assert type(listed).DESCRIPTOR.full_name == "grpc.reflection.v1.ServerReflectionResponse"
    assert [s.name for s in listed.list_services_response.service] == SERVICES
    assert listed.original_request.list_services == ""


def test_reflection_needs_a_token_when_the_server_has_tokens(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"team-a {TOKEN}\n")
    with serving(auth_tokens_file=str(tokens)) as srv, grpc.insecure_channel(srv.address) as ch:
        request = v1alpha.ServerReflectionRequest(list_services="")
        stub = v1alpha_grpc.ServerReflectionStub(ch)
        for ask in (
            lambda md: list(stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=md)),
            lambda md: list(
                ch.stream_stream(V1)(iter([request.SerializeToString()]), timeout=10, metadata=md)
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                ask(None)
            assert (err.value.code(), err.value.details()) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token",
            )
            with pytest.raises(grpc.RpcError) as err:
                ask((("authorization", "Bearer not-the-token-at-all"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            [answer] = ask((("authorization", f"Bearer {TOKEN}"),))
            if isinstance(answer, bytes):
                answer = v1alpha.ServerReflectionResponse.FromString(answer)
            assert [s.name for s in answer.list_services_response.service] == SERVICES
        # probes need no token
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
