"""Tenants: each has its own namespace. Another tenant's session is NOT_FOUND for every RPC that
names one (streams included) and stays unchanged; one id may name a session in each of two
tenants; ListSessions shows the caller's only, and its page tokens are the caller's only."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from normserve.client import Client
from normserve.server import Server
from normserve.server.service import (
    InvalidArgument,
    Mode,
    NotFound,
    ResourceExhausted,
    SessionConfig,
    SessionManager,
)
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_to_proto
from tests.grpc._util import expect_status, serving, unchanged

ALICE, BOB = secrets.token_hex(32), secrets.token_hex(32)
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    path = tmp_path / "tokens"
    path.write_text(f"alice {ALICE}\nbob {BOB}\n")
    with serving(auth_tokens_file=str(path)) as srv:
        yield srv


@pytest.fixture
def alice(server: Server) -> Iterator[Client]:
    with Client(server.address, timeout=30, metadata=bearer(ALICE)) as c:
        yield c


@pytest.fixture
def bob_stub(server: Server) -> Iterator[Callable[..., Any]]:
    """Calls a method of the raw stub as bob: ``bob("GetSession", request)``."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)

        def call(method: str, request: Any) -> Any:
            return getattr(stub, method)(request, metadata=bearer(BOB), timeout=30)

        yield call


def _stream(session_id: str, mode: int = pb.MODE_TRAIN) -> Iterator[pb.NormalizeStreamRequest]:
    x = torch.randn(8, 3)
    yield pb.NormalizeStreamRequest(session_id=session_id, mode=mode, chunk=tensor_to_proto(x[:4]))
    yield pb.NormalizeStreamRequest(chunk=tensor_to_proto(x[4:]), end_of_batch=True)


def _every_call_naming(session_id: str) -> list[tuple[str, Any]]:
    x = tensor_to_proto(torch.randn(4, 3))
    state = [pb.NamedTensor(name="running_mean", tensor=tensor_to_proto(torch.ones(3)))]
    return [
        ("GetSession", pb.GetSessionRequest(session_id=session_id)),
        ("ExportState", pb.ExportStateRequest(session_id=session_id)),
        ("ImportState", pb.ImportStateRequest(session_id=session_id, entries=state)),
        ("ResetSession", pb.ResetSessionRequest(session_id=session_id)),
        ("Normalize", pb.NormalizeRequest(session_id=session_id, mode=pb.MODE_TRAIN, input=x)),
        ("Normalize", pb.NormalizeRequest(session_id=session_id, mode=pb.MODE_EVAL, input=x)),
        ("NormalizeStream", _stream(session_id)),
        ("NormalizeStream", _stream(session_id, pb.MODE_EVAL)),
        ("DeleteSession", pb.DeleteSessionRequest(session_id=session_id)),
    ]


def test_another_tenants_session_is_not_found_by_any_rpc(
    alice: Client, bob_stub: Callable[..., Any]
) -> None:
    named = alice.create_session(3, session_id="alices").session_id
    generated = alice.create_session(3).session_id  # a server-generated id leaks nothing either
    for sid in (named, generated):
        alice.normalize(sid, torch.randn(5, 3))
        with unchanged(alice, sid):
            for method, request in _every_call_naming(sid):
                with expect_status(NOT_FOUND, f"session {sid!r} not found"):
                    answer = bob_stub(method, request)
                    if method == "NormalizeStream":
                        list(answer)
    assert {s.session_id for s in alice.list_sessions()} == {named, generated}


def test_one_id_names_a_session_in_each_tenant(server: Server, alice: Client) -> None:
    with Client(server.address, timeout=30, metadata=bearer(BOB)) as bob:
        a = alice.create_session(3, session_id="same", momentum=None)
        b = bob.create_session(4, session_id="same")  # not ALREADY_EXISTS: another namespace
        assert (a.num_features, b.num_features) == (3, 4)
        with unchanged(alice, "same"):
            bob.normalize("same", torch.randn(6, 4))
            list(bob.normalize_stream("same", [torch.randn(6, 4)]))
            bob.import_state("same", {"running_mean": torch.ones(4)}, strict=False)
            bob.reset_session("same")
            bob.delete_session("same")
        assert alice.get_session("same").num_features == 3
        assert bob.list_sessions() == []


def test_list_shows_the_callers_sessions_only(server: Server, alice: Client) -> None:
    with Client(server.address, timeout=30, metadata=bearer(BOB)) as bob:
        for i in range(3):
            alice.create_session(2, session_id=f"a{i}")
        bob.create_session(2, session_id="b0")
        assert [s.session_id for s in alice.list_sessions(page_size=2)] == ["a0", "a1", "a2"]
        assert [s.session_id for s in bob.list_sessions()] == ["b0"]
    assert len(server.sessions) == 4  # the server's count is of every tenant


def test_a_page_token_is_refused_to_another_tenant(
    server: Server, bob_stub: Callable[..., Any]
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        for i in range(3):
            request = pb.CreateSessionRequest(
                session_id=f"a{i}", config=pb.SessionConfig(num_features=2)
            )
            stub.CreateSession(request, metadata=bearer(ALICE), timeout=10)
            bob_stub("CreateSession", request)  # bob has the same ids: the token would fit
        first = stub.ListSessions(
            pb.ListSessionsRequest(page_size=1), metadata=bearer(ALICE), timeout=10
        )
        token = first.next_page_token
        assert [s.session_id for s in first.sessions] == ["a0"] and token
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT, "page_token: not a token this server issued"
        ):
            bob_stub("ListSessions", pb.ListSessionsRequest(page_size=1, page_token=token))
        second = stub.ListSessions(
            pb.ListSessionsRequest(page_size=1, page_token=token), metadata=bearer(ALICE)
        )
        assert [s.session_id for s in second.sessions] == ["a1"]


def test_tenant_views_share_one_registry_and_keep_apart() -> None:
    manager = SessionManager("cpu", max_sessions=4)
    a, b = manager.for_tenant("a"), manager.for_tenant("b")
    sa = a.create(SessionConfig(2), "x")
    sb = b.create(SessionConfig(2), "x")
    sb.normalize(torch.randn(4, 2), Mode.TRAIN)
    assert sa.state.version == 1 and sb.state.version == 2  # one store, its keys kept apart
    with pytest.raises(NotFound, match="session 'x' not found"):
        manager.get("x")  # the default tenant's view
    a.create(SessionConfig(2), "y")
    manager.create(SessionConfig(2), "x")
    with pytest.raises(ResourceExhausted, match=r"maximum of 4 sessions \(--max-sessions\)"):
        b.create(SessionConfig(2), "z")  # the server's limit counts every tenant
    page, token = a.list(page_size=1)
    assert [s.session_id for s in page] == ["x"] and token
    with pytest.raises(InvalidArgument, match="page_token: not a token this server issued"):
        b.list(page_token=token)
    assert [s.session_id for s in a.list(page_token=token)[0]] == ["y"]
    b.delete("x")
    assert sa.state.version == 1  # deleting b's x dropped b's state only
