"""State that outlives a call, a process and a replica, through real gRPC: idempotency keys,
idle TTLs, the local durable store across restarts, and Redis shared by two servers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from normserve.client import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from normserve.server import Server, Settings, start_server
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_to_proto
from tests._redis import RedisServer
from tests.grpc._util import metric, until


def _server(**settings: object) -> Server:
    base: dict[str, object] = {
        "address": "127.0.0.1:0",
        "metrics_address": "127.0.0.1:0",
        "device": "cpu",
    }
    return start_server(Settings(**{**base, **settings}))  # type: ignore[arg-type]


@pytest.fixture
def stub(server: Server) -> Iterator[pb_grpc.NormalizerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.NormalizerStub(channel)


def _request(sid: str, x: torch.Tensor, key: str, mode: int = pb.MODE_TRAIN) -> pb.NormalizeRequest:
    req = pb.NormalizeRequest(session_id=sid, mode=mode, idempotency_key=key)
    tensor_to_proto(x, req.input)
    return req


# ---- idempotency keys


def test_a_retried_train_call_is_answered_not_applied_again(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(4).session_id
    x = torch.randn(8, 4)
    first = stub.Normalize(_request(sid, x, "k-1"))
    again = stub.Normalize(_request(sid, x, "k-1"))
    assert not first.replayed and again.replayed
    assert again.version == first.version == 2
    assert again.mean == first.mean and again.var == first.var and again.output == first.output
    info = client.get_session(sid)
    assert info.num_batches_tracked == 1 and info.version == 2
    stub.Normalize(_request(sid, x, "k-2"))  # another key: applied
    assert client.get_session(sid).num_batches_tracked == 2


def test_a_key_reused_for_another_request_is_refused(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(4).session_id
    stub.Normalize(_request(sid, torch.randn(8, 4), "k"))
    with pytest.raises(grpc.RpcError) as info:
        stub.Normalize(_request(sid, torch.randn(9, 4), "k"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (info.value.details() or "")
    assert client.get_session(sid).num_batches_tracked == 1


@pytest.mark.parametrize("key", ["x" * 129, "has space", "tab\there", "é"])
def test_malformed_keys_are_refused_and_change_nothing(
    client: Client, stub: pb_grpc.NormalizerStub, key: str
) -> None:
    sid = client.create_session(4).session_id
    with pytest.raises(grpc.RpcError) as info:
        stub.Normalize(_request(sid, torch.randn(8, 4), key))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith("idempotency_key:")
    assert client.get_session(sid).version == 1


def test_eval_calls_ignore_keys(client: Client, stub: pb_grpc.NormalizerStub) -> None:
    sid = client.create_session(4).session_id
    for _ in range(2):
        r = stub.Normalize(_request(sid, torch.randn(8, 4), "same", pb.MODE_EVAL))
        assert not r.replayed
    assert client.get_session(sid).version == 1


def test_the_client_keys_every_train_call_and_streams_replay_too(client: Client) -> None:
    sid = client.create_session(4).session_id
    x = torch.randn(64, 4)
    a = client.normalize(sid, x, idempotency_key="stream-key")
    with Client(client.target, chunk_bytes=8 * 1024 + 4096 + 64) as small:  # streamed in chunks
        b = small.normalize(sid, x, idempotency_key="other-key")
        c = small.normalize(sid, x, idempotency_key="other-key")
    assert not a.replayed and not b.replayed and c.replayed
    assert c.version == b.version == 3
    torch.testing.assert_close(c.output, b.output)
    for _ in range(3):  # no key given: a fresh one each call
        client.normalize(sid, x)
    assert client.get_session(sid).num_batches_tracked == 5


# ---- idle TTL


def test_idle_sessions_expire_and_reads_do_not_keep_them() -> None:
    with _server(session_ttl=0) as srv, Client(srv.address) as client:
        short = client.create_session(2, ttl_seconds=1.0)
        kept = client.create_session(2)  # the server's default here: never
        assert short.ttl_seconds == 1.0 and short.expire_time is not None
        assert kept.ttl_seconds == 0 and kept.expire_time is None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.get_session(short.session_id)  # a read: does not keep it alive
            except NotFoundError:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the idle session did not expire")
        assert client.get_session(kept.session_id).num_batches_tracked == 0
        assert srv.sessions.expired == 1
        scrape = srv.metrics.registry.get_sample_value("normserve_sessions_expired_total")
        assert scrape == 1


def test_use_keeps_a_session_alive() -> None:
    with _server() as srv, Client(srv.address) as client:
        sid = client.create_session(2, ttl_seconds=1.5).session_id
        for _ in range(12):  # 3 s of use, each within the TTL of the last
            client.normalize(sid, torch.randn(4, 2))
            time.sleep(0.25)
        assert client.get_session(sid).num_batches_tracked == 12


def test_ttl_is_validated() -> None:
    with _server() as srv, Client(srv.address) as client:
        for bad in (-1.0, float("inf"), 1e12):
            with pytest.raises(InvalidArgumentError, match=r"config\.ttl_seconds"):
                client.create_session(2, ttl_seconds=bad)


def test_memory_store_default_ttl_is_a_day_and_durable_stores_none(tmp_path: Path) -> None:
    assert Settings().default_session_ttl() == 86400
    assert Settings(state_dir=str(tmp_path)).default_session_ttl() == 0
    assert Settings(store="redis://127.0.0.1:1/0").default_session_ttl() == 0
    assert Settings(session_ttl=5).default_session_ttl() == 5


# ---- the local durable store, through restarts


@pytest.mark.parametrize("durability", ["interval", "strict"])
def test_sessions_survive_a_restart(tmp_path: Path, durability: str) -> None:
    flags = {"state_dir": str(tmp_path), "durability": durability}
    xs = [torch.randn(16, 3) * 2 + 1 for _ in range(10)]
    with _server(**flags) as srv, Client(srv.address) as client:
        sid = client.create_session(3, session_id="kept", momentum=None).session_id
        for i, x in enumerate(xs):
            client.normalize(sid, x, idempotency_key=f"k{i}")
        gone = client.create_session(3, session_id="gone").session_id
        client.delete_session(gone)
        before = client.get_session(sid)
    with _server(**flags) as srv, Client(srv.address) as client:
        after = client.get_session(sid)
        assert [s.session_id for s in client.list_sessions()] == ["kept"]
        assert after.version == before.version and after.num_batches_tracked == 10
        torch.testing.assert_close(after.running_mean, before.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(after.running_var, before.running_var, rtol=0, atol=0)
        # the keys came back too: a retry of the last call is answered, not applied
        assert client.normalize(sid, xs[-1], idempotency_key="k9").replayed
        assert client.get_session(sid).num_batches_tracked == 10


def test_a_second_server_on_one_state_dir_is_refused(tmp_path: Path) -> None:
    with _server(state_dir=str(tmp_path)), pytest.raises(ValueError, match="state-dir"):
        _server(state_dir=str(tmp_path))


# ---- Redis: two servers, one set of sessions


def test_two_servers_on_one_redis_serve_the_same_sessions(redis_server: RedisServer) -> None:
    with (
        _server(store=redis_server.url) as a,
        _server(store=redis_server.url) as b,
        Client(a.address) as ca,
        Client(b.address) as cb,
    ):
        sid = ca.create_session(4, session_id="shared", momentum=0.1).session_id
        bn = torch.nn.BatchNorm1d(4, momentum=0.1)
        for i in range(20):  # alternating replicas: one sequence of updates
            x = torch.randn(8, 4) + i
            (ca if i % 2 else cb).normalize(sid, x)
            bn(x)
        for info in (ca.get_session(sid), cb.get_session(sid)):
            assert info.num_batches_tracked == 20 and info.version == 21
            torch.testing.assert_close(info.running_mean, bn.running_mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(info.running_var, bn.running_var, rtol=0, atol=1e-6)
        assert [s.session_id for s in cb.list_sessions()] == ["shared"]
        # a retry through the other replica is answered, not applied
        x = torch.randn(8, 4)
        first = ca.normalize(sid, x, idempotency_key="once")
        again = cb.normalize(sid, x, idempotency_key="once")
        assert again.replayed and again.version == first.version
        cb.delete_session(sid)
        with pytest.raises(NotFoundError):
            ca.normalize(sid, x)
        with pytest.raises(NotFoundError):
            ca.get_session(sid)


def test_redis_down_is_unavailable_and_the_server_recovers(redis_server: RedisServer) -> None:
    with _server(store=redis_server.url) as srv, Client(srv.address, retry=0) as client:
        sid = client.create_session(4).session_id
        client.normalize(sid, torch.randn(8, 4))
        redis_server.kill()
        with pytest.raises(UnavailableError) as info:
            client.normalize(sid, torch.randn(8, 4))
        assert "Redis at" in info.value.message and "half-applied" in info.value.message
        assert info.value.hint == ""  # the server answered: no "is the server running?" hint
        redis_server.restart()
        deadline = time.monotonic() + 15
        while True:
            try:
                client.normalize(sid, torch.randn(8, 4))
                break
            except UnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        # appendfsync always: the update acknowledged before the kill survived it
        assert client.get_session(sid).num_batches_tracked == 2


def test_round_robin_spreads_calls_over_replicas_that_share_redis(
    redis_server: RedisServer,
) -> None:
    """A client balancing per call (round_robin over a list of addresses, as over a headless
    Service's DNS name) sends one session's calls to every replica, and they are one sequence."""
    with _server(store=redis_server.url) as a, _server(store=redis_server.url) as b:
        target = f"ipv4:{a.address},{b.address}"
        with Client(target, load_balancing="round_robin") as client:
            sid = client.create_session(4, momentum=None).session_id
            bn = torch.nn.BatchNorm1d(4, momentum=None)
            for i in range(20):
                x = torch.randn(8, 4) * (i + 1)
                r = client.normalize(sid, x)
                bn(x)
                assert r.version == i + 2  # one order across both replicas
            info = client.get_session(sid)
        torch.testing.assert_close(info.running_var, bn.running_var, rtol=0, atol=1e-5)
        served = [
            s.metrics.registry.get_sample_value(
                "normserve_requests_total", {"method": "Normalize", "code": "OK"}
            )
            or 0
            for s in (a, b)
        ]
        assert sum(served) == 20 and min(served) >= 5, served


def test_load_balancing_is_checked() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        Client("127.0.0.1:1", load_balancing="random")


def test_a_redis_that_refuses_the_credentials_stops_the_start(redis_server: RedisServer) -> None:
    """Wrong credentials, or a database Redis does not have, are no outage to wait out."""
    import redis

    r = redis.Redis.from_url(redis_server.url)
    r.config_set("requirepass", "s3cret-pass")
    r.close()
    host = redis_server.url.split("//", 1)[1].rsplit("/", 1)[0]
    for url in (f"redis://{host}/0", f"redis://:wrong-pass@{host}/0"):
        with pytest.raises(ValueError, match="refused this server's credentials") as info:
            _server(store=url)
        assert "wrong-pass" not in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="DB index"):
        _server(store=f"redis://:s3cret-pass@{host}/99")
    with _server(store=f"redis://:s3cret-pass@{host}/3") as srv, Client(srv.address) as client:
        assert client.create_session(2).num_features == 2


def test_retry_zero_is_one_try_and_the_default_retries(redis_server: RedisServer) -> None:
    """retry=0 (and the CLI) sends a refused call once: no gRPC retry policy behind it either."""
    with _server(store=redis_server.url) as srv:
        with Client(srv.address) as admin:
            sid = admin.create_session(2).session_id
        redis_server.kill()

        def unavailable() -> float:
            return metric(
                srv.metrics.registry, "normserve_requests_total", method="GetSession",
                code="UNAVAILABLE",
            )  # fmt: skip

        # the server counts a call as its answer goes out, so the client may see the answer
        # first: wait (bounded) for the count, then long enough for a retry to show
        with Client(srv.address, retry=0) as once, pytest.raises(UnavailableError):
            once.get_session(sid)
        assert until(lambda: unavailable() >= 1, 10)
        time.sleep(0.5)
        assert unavailable() == 1
        with Client(srv.address, timeout=1.0) as patient, pytest.raises(UnavailableError):
            patient.get_session(sid)  # retried within its timeout, then the refusal is raised
        assert until(lambda: unavailable() > 2, 10)
