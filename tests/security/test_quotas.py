"""Per-tenant quotas: sessions, session memory, open streams, in-flight bytes, requests per
second. Over one: RESOURCE_EXHAUSTED naming the flag, nothing allocated, the refusal counted by
tenant and quota; what was held is given back after a delete, a stream's end, a request's end.
The default tenant (no tokens) has them too."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from normserve import wire
from normserve.client import Client, NormserveError
from normserve.server import Settings
from normserve.server.service import QuotaExceeded, QuotaLimits, TenantQuotas, _manager
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from tests.grpc._util import expect_status, metric, serving, settled, unchanged, until

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
NORMALIZE = "/normserve.v1.Normalizer/Normalize"
STREAM = "/normserve.v1.Normalizer/NormalizeStream"


def held(registry: CollectorRegistry, what: str, tenant: str = "default") -> float:
    return metric(registry, f"normserve_tenant_{what}", tenant=tenant)


def rejected(registry: CollectorRegistry, quota: str, tenant: str = "default") -> float:
    return metric(registry, "normserve_quota_rejections_total", tenant=tenant, quota=quota)


def test_the_defaults_are_the_servers() -> None:
    settings = Settings()
    assert {f.name: getattr(QuotaLimits(), f.name) for f in fields(QuotaLimits)} == {
        "sessions": settings.quota_sessions,
        "session_bytes": settings.quota_session_bytes,
        "streams": settings.quota_streams,
        "inflight_bytes": settings.quota_inflight_bytes,
        "rps": settings.quota_rps,
    }


def test_sessions() -> None:
    registry = CollectorRegistry()
    with serving(registry, quota_sessions=2) as srv, Client(srv.address, timeout=30) as client:
        client.create_session(2, session_id="s0")
        client.create_session(2, session_id="s1")
        with pytest.raises(NormserveError) as err:
            client.create_session(2, session_id="s2")
        assert (err.value.code, err.value.message) == (
            EXHAUSTED,
            "tenant 'default' is at its --quota-sessions of 2 sessions; delete some",
        )
        assert len(srv.sessions) == 2
        assert rejected(registry, "sessions") == 1
        client.delete_session("s0")
        client.create_session(2, session_id="s2")  # a delete gives its place back
        assert held(registry, "sessions") == 2


def test_sessions_are_counted_per_tenant(tmp_path: Path) -> None:
    alice, bob = secrets.token_hex(32), secrets.token_hex(32)
    path = tmp_path / "tokens"
    path.write_text(f"alice {alice}\nbob {bob}\n")
    registry = CollectorRegistry()
    with serving(registry, quota_sessions=1, auth_tokens_file=str(path)) as srv:
        meta = {t: (("authorization", f"Bearer {t}"),) for t in (alice, bob)}
        with Client(srv.address, timeout=30, metadata=meta[alice]) as a:
            a.create_session(2, session_id="x")
            with pytest.raises(NormserveError) as err:
                a.create_session(2, session_id="y")
            assert err.value.message == (
                "tenant 'alice' is at its --quota-sessions of 1 sessions; delete some"
            )
        with Client(srv.address, timeout=30, metadata=meta[bob]) as b:
            b.create_session(2, session_id="x")  # alice's quota is alice's
        assert rejected(registry, "sessions", "alice") == 1
        assert rejected(registry, "sessions", "bob") == 0


def test_session_memory_is_counted_before_anything_is_allocated(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built = []
    real = _manager.Session

    def spy(*args: Any, **kwargs: Any) -> Any:
        built.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(_manager, "Session", spy)
    registry = CollectorRegistry()
    # a message limit that lets a session of 2^24 features through --max-features
    with (
        serving(registry, quota_session_bytes=128 << 20, max_message_bytes=(1 << 28) + 8192) as srv,
        Client(srv.address, timeout=30) as client,
    ):
        with pytest.raises(NormserveError) as err:
            client.create_session(1 << 24, session_id="huge")
        assert (err.value.code, err.value.message) == (
            EXHAUSTED,
            "tenant 'default' would exceed its --quota-session-bytes of 134217728 bytes: the "
            "session needs 268435464 bytes of state and the tenant's sessions hold 0; nothing "
            "was allocated",
        )
        assert built == [] and len(srv.sessions) == 0
        assert held(registry, "session_bytes") == 0 and held(registry, "sessions") == 0
        assert rejected(registry, "session_bytes") == 1
        # four [C] float32 tensors and the int64 count; fewer without affine or running stats
        client.create_session(1 << 16, session_id="a")
        client.create_session(1 << 16, session_id="b", affine=False)
        client.create_session(1 << 16, session_id="c", affine=False, track_running_stats=False)
        assert held(registry, "session_bytes") == (16 << 16) + 8 + (8 << 16) + 8
        client.delete_session("a")
        assert held(registry, "session_bytes") == (8 << 16) + 8
        with pytest.raises(NormserveError, match=r"config.initial_weight: expected shape \[4\]"):
            client.create_session(4, session_id="d", weight=torch.ones(3))
        assert held(registry, "session_bytes") == (8 << 16) + 8  # a refused create holds nothing
        assert held(registry, "sessions") == 2
        assert built == ["a", "b", "c", "d"]


def _holding_open(release: threading.Event) -> Iterator[pb.NormalizeStreamRequest]:
    release.wait(30)
    yield from ()


def test_open_streams() -> None:
    registry = CollectorRegistry()
    release = threading.Event()
    with serving(registry, quota_streams=2) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        try:
            calls = [stub.NormalizeStream(_holding_open(release), timeout=30) for _ in range(2)]
            assert settled(registry, "normserve_tenant_open_streams", 2, tenant="default") == 2
            with expect_status(
                EXHAUSTED,
                "tenant 'default' is at its --quota-streams of 2 open streams; end one before "
                "opening another",
            ):
                list(stub.NormalizeStream(iter([]), timeout=30))
            assert rejected(registry, "streams") == 1
            calls[0].cancel()  # a cancelled stream gives its place back too
            assert settled(registry, "normserve_tenant_open_streams", 1, tenant="default") == 1
            calls[0] = stub.NormalizeStream(_holding_open(release), timeout=30)
            assert settled(registry, "normserve_tenant_open_streams", 2, tenant="default") == 2
        finally:
            release.set()
        assert [list(call) for call in calls] == [[], []]
        assert settled(registry, "normserve_tenant_open_streams", 0, tenant="default") == 0
        with Client(srv.address, timeout=30) as client:  # the places are free again
            sid = client.create_session(3).session_id
            for _ in range(3):
                assert len(list(client.normalize_stream(sid, [torch.randn(4, 3)]))) == 1


def test_inflight_bytes() -> None:
    registry = CollectorRegistry()
    limit = 64 << 10
    with (
        serving(registry, quota_inflight_bytes=limit) as srv,
        Client(srv.address, timeout=30) as client,
        grpc.insecure_channel(srv.address) as channel,
    ):
        sid = client.create_session(10).session_id
        normalize = channel.unary_unary(NORMALIZE)
        big = wire.encode_normalize_request(sid, pb.MODE_TRAIN, torch.randn(2000, 10), False)
        with unchanged(client, sid):
            with expect_status(
                EXHAUSTED,
                f"tenant 'default' cannot have a request of {len(big)} bytes in flight: its "
                f"--quota-inflight-bytes is {limit}",
            ):
                normalize(big, timeout=30)
            stream = channel.stream_stream(STREAM)
            chunk = wire.encode_stream_request(
                sid, pb.MODE_TRAIN, torch.randn(2000, 10), True, False
            )
            with expect_status(
                EXHAUSTED,
                f"tenant 'default' cannot have a request of {len(chunk)} bytes in flight: its "
                f"--quota-inflight-bytes is {limit}",
            ):
                list(stream(iter([chunk]), timeout=30))
        # two that fit one at a time but not together: the first waits for the session's lock
        body = wire.encode_normalize_request(sid, pb.MODE_TRAIN, torch.randn(1000, 10), False)
        assert limit // 2 < len(body) <= limit
        session = srv.sessions.get(sid)
        session._lock.acquire()
        try:
            first = normalize.future(body, timeout=30)
            assert until(lambda: held(registry, "inflight_bytes") == len(body))
            with expect_status(
                EXHAUSTED,
                f"tenant 'default' is at its --quota-inflight-bytes of {limit}: {len(body)} bytes "
                f"of its requests are being processed, this one has {len(body)}; retry later",
            ):
                normalize(body, timeout=30)
        finally:
            session._lock.release()
        assert first.result()
        assert settled(registry, "normserve_tenant_inflight_bytes", 0, tenant="default") == 0
        normalize(body, timeout=30)
        assert client.get_session(sid).num_batches_tracked == 2
        assert rejected(registry, "inflight_bytes") == 3


def test_requests_per_second() -> None:
    registry = CollectorRegistry()
    with serving(registry, quota_rps=2) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        refused = 0
        for _ in range(12):  # the bucket holds 2 and refills 2 a second: not all 12 pass
            try:
                stub.ListSessions(pb.ListSessionsRequest(), timeout=30)
            except grpc.RpcError as err:
                assert err.code() == EXHAUSTED
                assert err.details() == (
                    "tenant 'default' is over its --quota-rps of 2 requests per second; retry later"
                )
                refused += 1
        assert refused > 0
        assert (
            settled(
                registry, "normserve_quota_rejections_total", refused, tenant="default", quota="rps"
            )
            == refused
        )
        health = health_pb2_grpc.HealthStub(channel)  # probes are not a tenant's requests
        for _ in range(5):
            answer = health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _admitted(quotas: TenantQuotas, tenant: str, tries: int) -> int:
    n = 0
    for _ in range(tries):
        try:
            quotas.admit(tenant)
            n += 1
        except QuotaExceeded as err:
            assert (err.tenant, err.quota) == (tenant, "rps")
    return n


def test_the_token_bucket_holds_one_second_and_refills() -> None:
    clock = _Clock()
    refusals: list[tuple[str, str]] = []
    quotas = TenantQuotas(
        QuotaLimits(rps=3), on_reject=lambda t, q: refusals.append((t, q)), clock=clock
    )
    assert _admitted(quotas, "a", 10) == 3  # one second's burst
    assert _admitted(quotas, "b", 10) == 3  # another tenant: its own bucket
    clock.now += 0.5  # 1.5 requests' worth
    assert _admitted(quotas, "a", 10) == 1
    clock.now += 60
    assert _admitted(quotas, "a", 10) == 3  # never more than a second's worth
    assert len(refusals) == 7 + 7 + 9 + 7
    slow = TenantQuotas(QuotaLimits(rps=0.5), clock=clock)
    assert _admitted(slow, "a", 3) == 1  # a rate under 1/s still admits one
    clock.now += 1.0
    assert _admitted(slow, "a", 1) == 0
    clock.now += 1.0
    assert _admitted(slow, "a", 1) == 1


def test_zero_means_no_limit() -> None:
    quotas = TenantQuotas(QuotaLimits(0, 0, 0, 0, 0))
    for _ in range(10_000):
        quotas.admit("a")
        quotas.reserve_session("a", 1 << 40)
        quotas.open_stream("a")
        quotas.acquire_inflight("a", 1 << 40)
    assert quotas.usage("a") == {
        "sessions": 10_000,
        "session_bytes": 10_000 << 40,
        "streams": 10_000,
        "inflight_bytes": 10_000 << 40,
    }
