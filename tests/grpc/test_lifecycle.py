"""Session lifecycle over gRPC, health and reflection."""

from __future__ import annotations

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from normserve.client import Client
from normserve.server import Server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc


def test_create_get_list_delete(client: Client) -> None:
    a = client.create_session(3, session_id="a", momentum=None, eps=1e-3, affine=False)
    assert a.momentum is None and a.eps == 1e-3 and not a.affine and a.weight is None
    assert a.version == 1 and a.num_batches_tracked == 0 and a.device == "cpu"
    assert a.running_mean.eq(0).all() and a.running_var.eq(1).all()
    b = client.create_session(2)
    assert len(b.session_id) == 32 and b.momentum == 0.1
    assert {s.session_id for s in client.list_sessions(page_size=1)} == {"a", b.session_id}
    assert client.get_session("a", tensors=False).running_mean is None
    client.delete_session("a")
    assert [s.session_id for s in client.list_sessions()] == [b.session_id]


def test_unset_momentum_on_the_wire_is_cumulative(stub: pb_grpc.NormalizerStub) -> None:
    s = stub.CreateSession(pb.CreateSessionRequest(config=pb.SessionConfig(num_features=2))).session
    assert not s.config.HasField("momentum")
    assert s.config.eps == 1e-5 and s.config.affine and s.config.track_running_stats


def test_initial_weight_and_bias(client: Client) -> None:
    w, b = torch.tensor([2.0, 3.0]), torch.tensor([-1.0, 1.0])
    sid = client.create_session(2, weight=w, bias=b).session_id
    x = torch.randn(5, 2)
    bn = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        bn.weight.copy_(w)
        bn.bias.copy_(b)
    torch.testing.assert_close(client.normalize(sid, x).output, bn(x), atol=1e-5, rtol=1e-5)


def test_reset_export_import(client: Client) -> None:
    sid = client.create_session(3).session_id
    client.normalize(sid, torch.randn(6, 3, 2, 2) + 5)
    state = client.export_state(sid)
    bn = torch.nn.BatchNorm2d(3)
    bn.load_state_dict(state)  # torch accepts what export returns
    info = client.reset_session(sid)
    assert info.version == 3 and info.num_batches_tracked == 0
    info = client.import_state(sid, bn.state_dict())
    assert info.version == 4 and info.num_batches_tracked == 1
    torch.testing.assert_close(info.running_mean, state["running_mean"])


def test_health_and_reflection(server: Server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "normserve.v1.Normalizer"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        (resp,) = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name for s in resp.list_services_response.service}
        assert "normserve.v1.Normalizer" in names and "grpc.health.v1.Health" in names


def test_stop_turns_health_not_serving(server: Server) -> None:
    server.health.enter_graceful_shutdown()
    with grpc.insecure_channel(server.address) as channel:
        resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
