"""Bearer tokens: missing, wrong and right ones, the file re-read when it changes, the environment,
startup errors that name the line and never the token, and no token in logs, metrics or messages."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest

from normserve.client import Client
from normserve.server import Server, Settings, start_server
from normserve.server._transport._auth import ENV_TOKENS, TokenTable, parse_tokens
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from tests.grpc._util import expect_status, metric, serving, settled, until

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
ALICE, BOB = secrets.token_hex(32), secrets.token_hex(32)


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def write_tokens(path: Path, text: str) -> None:
    """Replaces the file as an operator should: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    write_tokens(path, f"# tenant token\nalice {ALICE}\n\nbob {BOB}\n")
    return path


@pytest.fixture
def server(tokens_file: Path) -> Iterator[Server]:
    with serving(CollectorRegistry(), auth_tokens_file=str(tokens_file)) as srv:
        yield srv


@pytest.fixture
def stub(server: Server) -> Iterator[pb_grpc.NormalizerStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.NormalizerStub(channel)


def test_a_call_without_a_token_is_unauthenticated(stub: pb_grpc.NormalizerStub) -> None:
    with expect_status(UNAUTHENTICATED, "missing bearer token"):
        stub.ListSessions(pb.ListSessionsRequest(), timeout=10)
    for scheme in (("authorization", f"Basic {ALICE}"), ("authorization", ALICE)):
        with expect_status(UNAUTHENTICATED, "missing bearer token"):
            stub.ListSessions(pb.ListSessionsRequest(), metadata=(scheme,), timeout=10)
    # a stream is refused before any of its requests is read
    requests = iter([pb.NormalizeStreamRequest(session_id="s", end_of_batch=True)])
    with expect_status(UNAUTHENTICATED, "missing bearer token"):
        list(stub.NormalizeStream(requests, timeout=10))


def test_a_wrong_token_is_unauthenticated(stub: pb_grpc.NormalizerStub) -> None:
    for wrong in (ALICE[:-1], ALICE + "0", ALICE.upper(), "x" * 64, BOB[::-1]):
        with expect_status(UNAUTHENTICATED, "invalid token"):
            stub.CreateSession(
                pb.CreateSessionRequest(config=pb.SessionConfig(num_features=2)),
                metadata=bearer(wrong),
                timeout=10,
            )


def test_the_right_token_acts_as_its_tenant(server: Server, stub: pb_grpc.NormalizerStub) -> None:
    req = pb.CreateSessionRequest(session_id="s", config=pb.SessionConfig(num_features=2))
    stub.CreateSession(req, metadata=bearer(ALICE), timeout=10)
    # the scheme is case-insensitive, as HTTP's
    got = stub.GetSession(
        pb.GetSessionRequest(session_id="s"),
        metadata=(("authorization", f"bearer {ALICE}"),),
        timeout=10,
    )
    assert got.session.session_id == "s"
    assert [s.session_id for s in server.sessions.for_tenant("alice").list()[0]] == ["s"]
    assert server.sessions.for_tenant("bob").list()[0] == []
    assert server.sessions.list()[0] == []  # nor the default tenant's


def test_the_token_is_checked_before_the_request_is_decoded(server: Server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        create = channel.unary_unary("/normserve.v1.Normalizer/CreateSession")
        garbage = b"\xff\xff\xff"
        with expect_status(UNAUTHENTICATED, "missing bearer token"):
            create(garbage, timeout=10)
        with expect_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "request: not a valid normserve.v1.CreateSessionRequest message (Error parsing "
            "message with type 'normserve.v1.CreateSessionRequest': Wire format was corrupt)",
        ):
            create(garbage, metadata=bearer(ALICE), timeout=10)


def test_health_is_open_and_reflection_needs_a_token(server: Server) -> None:
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        with expect_status(UNAUTHENTICATED, "missing bearer token"):
            list(reflect.ServerReflectionInfo(iter([ask]), timeout=10))
        answers = list(reflect.ServerReflectionInfo(iter([ask]), metadata=bearer(BOB), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "normserve.v1.Normalizer" in names


def test_a_changed_file_is_reloaded(server: Server, tokens_file: Path) -> None:
    newer = secrets.token_hex(32)
    with Client(server.address, timeout=10, metadata=bearer(ALICE)) as alice:
        alice.create_session(2, session_id="kept")
    write_tokens(tokens_file, f"alice {newer}\n")
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        with expect_status(UNAUTHENTICATED, "invalid token"):
            stub.GetSession(pb.GetSessionRequest(session_id="kept"), metadata=bearer(ALICE))
        with expect_status(UNAUTHENTICATED, "invalid token"):  # bob is gone
            stub.GetSession(pb.GetSessionRequest(session_id="kept"), metadata=bearer(BOB))
        got = stub.GetSession(pb.GetSessionRequest(session_id="kept"), metadata=bearer(newer))
        assert got.session.session_id == "kept"  # a new token of the same tenant: its sessions


def test_a_broken_file_keeps_the_previous_tokens_and_says_which_line(
    server: Server, tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    short = "tooshort"
    with caplog.at_level(logging.INFO, logger="normserve"):
        write_tokens(tokens_file, f"alice {ALICE}\nbob {short}\n")
        with Client(server.address, timeout=10, metadata=bearer(BOB)) as bob:
            assert bob.list_sessions() == []  # bob's old token still works
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"tokens not reloaded, the previous ones stay in use: --auth-tokens-file {tokens_file}: "
        "line 2: the token must be 16-4096 visible ASCII characters (no spaces); 'openssl rand "
        "-hex 32' makes one"
    ]
    assert short not in caplog.text and ALICE not in caplog.text


def test_tokens_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_TOKENS, f"alice {ALICE}; bob {BOB}")
    with serving() as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        with expect_status(UNAUTHENTICATED, "missing bearer token"):
            stub.ListSessions(pb.ListSessionsRequest(), timeout=10)
        stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(BOB), timeout=10)


def test_both_a_file_and_the_environment_is_refused(
    tokens_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_TOKENS, f"alice {ALICE}")
    with pytest.raises(ValueError) as err:
        TokenTable.load(str(tokens_file))
    assert str(err.value) == f"--auth-tokens-file and {ENV_TOKENS}: set one, not both"


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (f"alice {ALICE} extra", "line 1: expected 'TENANT TOKEN' (two fields)"),
        (f"# c\n\n{ALICE}", "line 3: expected 'TENANT TOKEN' (two fields)"),
        (
            f"alice {ALICE}\n-bob {BOB}",
            "line 2: the tenant must be 1-64 characters of [A-Za-z0-9._-], beginning with a "
            "letter or digit",
        ),
        (
            f"{ALICE} alice",  # columns swapped: the message must not show the token
            "line 1: the token must be 16-4096 visible ASCII characters (no spaces); 'openssl "
            "rand -hex 32' makes one",
        ),
        (
            "alice short",
            "line 1: the token must be 16-4096 visible ASCII characters (no spaces); 'openssl "
            "rand -hex 32' makes one",
        ),
        (f"alice {ALICE}\nbob {ALICE}", "line 2: the same token as line 1"),
        ("# nothing\n", "no tokens (lines of 'TENANT TOKEN')"),
    ],
)
def test_unusable_lines_are_named_by_number(text: str, error: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_tokens(text, "src")
    assert str(err.value) == f"src: {error}"
    assert ALICE not in str(err.value) and BOB not in str(err.value)


def test_a_server_with_unusable_tokens_does_not_start(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice {ALICE}\nbob {BOB} {BOB}\n")
    settings = Settings(address="127.0.0.1:0", metrics_address="off", auth_tokens_file=str(path))
    with pytest.raises(ValueError) as err:
        start_server(settings)
    assert (
        str(err.value) == f"--auth-tokens-file {path}: line 2: expected 'TENANT TOKEN' (two fields)"
    )
    missing = settings.replace(auth_tokens_file=str(tmp_path / "absent"))
    with pytest.raises(OSError) as oserr:
        start_server(missing)
    assert str(oserr.value) == (
        f"--auth-tokens-file {tmp_path / 'absent'}: cannot read it (No such file or directory)"
    )


def test_the_table_keeps_no_token(tokens_file: Path) -> None:
    table = TokenTable.load(str(tokens_file))
    assert table is not None and table.tenants == ["alice", "bob"]
    kept = repr(vars(table)) + repr(vars(table._table))
    assert ALICE not in kept and BOB not in kept
    assert ALICE.encode() not in kept.encode()


def test_tokens_appear_in_no_log_metric_or_message(
    tokens_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    near = ALICE[:-4] + "beef"  # a wrong token close to a real one
    details = []
    with (
        caplog.at_level(logging.DEBUG),
        serving(registry, auth_tokens_file=str(tokens_file)) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.NormalizerStub(channel)
        for token in (ALICE, near, BOB):
            try:
                stub.GetSession(
                    pb.GetSessionRequest(session_id="nope"), metadata=bearer(token), timeout=10
                )
            except grpc.RpcError as err:
                details.append(f"{err.code().name} {err.details()}")
                trailers = repr(err.trailing_metadata())  # type: ignore[attr-defined]
                assert token not in trailers and "authorization" not in trailers
        write_tokens(tokens_file, f"alice {ALICE}\nbob {BOB} extra\n")  # a reload that fails
        stub.ListSessions(pb.ListSessionsRequest(), metadata=bearer(ALICE), timeout=10)
        assert (
            settled(
                registry, "normserve_tenant_requests_total", 1, tenant="", code="UNAUTHENTICATED"
            )
            == 1
        )
        assert until(lambda: "not reloaded" in caplog.text)
        exposition = generate_latest(registry).decode()
    assert details == [
        "NOT_FOUND session 'nope' not found",
        "UNAUTHENTICATED invalid token",
        "NOT_FOUND session 'nope' not found",
    ]
    for token in (ALICE, near, BOB):
        assert token not in caplog.text
        assert token not in exposition
        assert token[:16] not in caplog.text + exposition
    assert (
        metric(registry, "normserve_tenant_requests_total", tenant="alice", code="NOT_FOUND") == 1
    )
    assert metric(registry, "normserve_tenant_requests_total", tenant="bob", code="NOT_FOUND") == 1
