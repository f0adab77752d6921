"""Session lifecycle over gRPC, health and reflection, and what ``Server.stop`` does to them."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from normserve.client import Client
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

from ._util import tensor

# The contract (normserve.proto, CreateSessionRequest.session_id): 1-128 characters of [A-Za-z0-9._-].
SESSION_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def test_create_get_list_delete(client: Client) -> None:
    a = client.create_session(3, session_id="a", momentum=None, eps=1e-3, affine=False)
    assert a.momentum is None and a.eps == 1e-3 and not a.affine and a.weight is None
    assert a.version == 1 and a.num_batches_tracked == 0 and a.device == "cpu"
    assert a.running_mean.eq(0).all() and a.running_var.eq(1).all()
    b = client.create_session(2)
    assert SESSION_ID.fullmatch(b.session_id) and b.momentum == 0.1
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


def test_server_chosen_ids_follow_the_contract(client: Client) -> None:
    """Ids the server picks are valid client-chosen ids too (the contract's alphabet and length),
    distinct, and name their session; their length and format beyond that are not promised."""
    ids = [client.create_session(1).session_id for _ in range(50)]
    for sid in ids:
        assert SESSION_ID.fullmatch(sid), sid
    assert len(set(ids)) == len(ids)
    assert {s.session_id for s in client.list_sessions()} == set(ids)
    assert client.get_session(ids[-1], tensors=False).session_id == ids[-1]


def _status_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def _plain_server() -> Server:
    return start_server(Settings(address="127.0.0.1:0", metrics_address="off", device="cpu"))


def _finish(srv: Server, stopper: threading.Thread) -> None:
    if stopper.ident is None:  # the test failed before it began stopping the server
        srv.stop(0)
    else:
        stopper.join(10)


def test_stop_turns_health_not_serving() -> None:
    """A load balancer watching health must see NOT_SERVING from ``Server.stop`` itself, while the
    server drains: nothing but ``stop`` is called here, and the watch is the call in flight that
    the grace period keeps alive long enough to hear it. (Without that step in ``stop``, the watch
    hears nothing until the grace period ends and the call is cut: ``seen`` ends in an error.)"""
    srv = _plain_server()
    stopper = threading.Thread(target=srv.stop, args=(3.0,))
    seen: list[str] = []
    try:
        with grpc.insecure_channel(srv.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            seen.append(_status_name(next(watch).status))
            stopper.start()
            try:
                seen.append(_status_name(next(watch).status))
            except grpc.RpcError as err:
                seen.append(f"call ended: {err.code().name}")
            watch.cancel()  # the only call in flight: stop need not wait out the grace period
    finally:
        _finish(srv, stopper)
    assert seen == ["SERVING", "NOT_SERVING"]
    assert not stopper.is_alive()


def test_stop_lets_calls_in_flight_finish_and_refuses_new_ones() -> None:
    """During ``stop(grace)``: a stream in flight finishes its batch, new calls are UNAVAILABLE."""
    srv = _plain_server()
    with Client(srv.address) as client:
        sid = client.create_session(2).session_id
    draining = threading.Event()

    def batch() -> pb.NormalizeStreamRequest:
        return pb.NormalizeStreamRequest(
            session_id=sid, mode=pb.MODE_TRAIN, chunk=tensor(torch.randn(4, 2)), end_of_batch=True
        )

    def requests() -> Iterator[pb.NormalizeStreamRequest]:
        yield batch()
        draining.wait(10)
        yield batch()

    stopper = threading.Thread(target=srv.stop, args=(10.0,))
    refused: grpc.StatusCode | None = None
    try:
        with grpc.insecure_channel(srv.address) as channel:
            call = pb_grpc.NormalizerStub(channel).NormalizeStream(requests(), timeout=20)
            assert next(call).version == 2  # the stream is in flight
            stopper.start()
            deadline = time.monotonic() + 5
            with grpc.insecure_channel(srv.address) as fresh:
                health = health_pb2_grpc.HealthStub(fresh)
                # a call that races with the start of the shutdown may end CANCELLED instead
                while refused is not grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline:
                    try:
                        health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    except grpc.RpcError as err:
                        refused = err.code()
                    time.sleep(0.01)
            draining.set()
            assert [a.version for a in call] == [3]  # the batch sent while draining was applied
    finally:
        draining.set()
        _finish(srv, stopper)
    assert refused is grpc.StatusCode.UNAVAILABLE
    assert not stopper.is_alive()
