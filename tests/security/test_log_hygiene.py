"""Input that reaches logs: a request id that could forge a log line is replaced, session ids are
checked at every RPC that names one, and what a message or log line echoes of a client's text is
escaped and short, however long the text."""

from __future__ import annotations

import io
import logging
import socket
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import torch

from normserve.client import Client
from normserve.server import Server
from normserve.server._logging import JsonFormatter, PlainFormatter
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc
from normserve.wire import tensor_to_proto
from tests.grpc._util import expect_status, serving, unchanged, until

INVALID = grpc.StatusCode.INVALID_ARGUMENT
RULE = "session_id: must be 1-128 characters of [A-Za-z0-9._-], not . or .., got "
HUGE = 15_000_000
FORGED = "abc\n2030-01-01 00:00:00,000 ERROR normserve.server [x] FAKE: disk on fire"


@pytest.fixture
def plain_log() -> Iterator[io.StringIO]:
    """The server's log lines as --log-format plain writes them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(PlainFormatter())
    logger = logging.getLogger("normserve")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


def _h2_call(
    address: str, path: str, body: bytes, headers: list[tuple[str, str]]
) -> dict[str, str]:
    """One gRPC call over raw HTTP/2, with headers grpc's own client would refuse to send;
    returns the response's headers and trailers."""
    host, port = address.rsplit(":", 1)
    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config=config)
    out: dict[str, str] = {}
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        request_headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", address),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *headers,
        ]
        conn.send_headers(stream, request_headers)
        conn.send_data(stream, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        sock.sendall(conn.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    out.update((_text(k), _text(v)) for k, v in event.headers)
                ended |= isinstance(event, h2.events.StreamEnded | h2.events.StreamReset)
            sock.sendall(conn.data_to_send())
    return out


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def test_a_request_id_with_a_newline_forges_no_log_line(
    server: Server, plain_log: io.StringIO
) -> None:
    body = pb.GetSessionRequest(session_id="nope").SerializeToString()
    path = "/normserve.v1.Normalizer/GetSession"
    answer = _h2_call(server.address, path, body, [("x-request-id", FORGED)])
    assert (answer["grpc-status"], answer["grpc-message"]) == ("5", "session 'nope' not found")
    generated = answer["x-request-id"]
    assert generated != FORGED
    ok = _h2_call(server.address, path, body, [("x-request-id", "trace-7:a/b.c_d")])
    assert ok["x-request-id"] == "trace-7:a/b.c_d"  # a safe id is kept
    assert until(lambda: plain_log.getvalue().count("GetSession NOT_FOUND") == 2)
    lines = plain_log.getvalue().splitlines()
    assert "FAKE" not in plain_log.getvalue() and "disk on fire" not in plain_log.getvalue()
    assert len(lines) == 3, lines
    assert lines[0].endswith(
        f"INFO normserve.server.access [{generated}] the client's x-request-id ({len(FORGED)} "
        f"characters) is not 1-128 of [A-Za-z0-9._:/-]; this call's id is {generated} instead"
    )
    assert f"[{generated}] GetSession NOT_FOUND" in lines[1]
    assert "[trace-7:a/b.c_d] GetSession NOT_FOUND" in lines[2]


@pytest.mark.parametrize("request_id", ["a" * 129, "has space", "semi;colon", "quote'"])
def test_request_ids_outside_the_safe_set_are_replaced(server: Server, request_id: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSession(
                pb.GetSessionRequest(session_id="nope"),
                metadata=(("x-request-id", request_id),),
                timeout=10,
            )
    trailers = dict(err.value.trailing_metadata())  # type: ignore[attr-defined]
    assert trailers["x-request-id"] != request_id
    assert request_id not in trailers["x-request-id"]


def test_the_plain_format_writes_one_line_per_record() -> None:
    record = logging.LogRecord(
        "normserve", logging.INFO, __file__, 1, "a %s", ("b\nc\r\x1b[31m",), None
    )
    record.request_id = "r\nq"
    line = PlainFormatter().format(record)
    assert line.endswith(" INFO normserve [r\\nq] a b\\nc\\r\\x1b[31m"), line
    assert record.getMessage() == "a b\nc\r\x1b[31m"  # the record itself is left as it was
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord("n", logging.ERROR, __file__, 1, "x", (), sys.exc_info())
    assert PlainFormatter().format(failed).count("\n") >= 2  # tracebacks keep their lines
    assert "\n" not in JsonFormatter().format(record)


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 64 else repr(text[:64]) + f"... ({len(text)} chars)"


def _expected(session_id: str) -> str:
    return "session_id: must not be empty" if not session_id else RULE + _shown(session_id)


def _naming(session_id: str) -> list[tuple[str, Any]]:
    x = tensor_to_proto(torch.randn(4, 3))
    return [
        ("GetSession", pb.GetSessionRequest(session_id=session_id)),
        ("DeleteSession", pb.DeleteSessionRequest(session_id=session_id)),
        ("ResetSession", pb.ResetSessionRequest(session_id=session_id)),
        ("ExportState", pb.ExportStateRequest(session_id=session_id)),
        ("ImportState", pb.ImportStateRequest(session_id=session_id)),
        (
            "CreateSession",
            pb.CreateSessionRequest(session_id=session_id, config=pb.SessionConfig(num_features=3)),
        ),
        ("Normalize", pb.NormalizeRequest(session_id=session_id, mode=pb.MODE_TRAIN, input=x)),
        (
            "NormalizeStream",
            [
                pb.NormalizeStreamRequest(
                    session_id=session_id, mode=pb.MODE_TRAIN, chunk=x, end_of_batch=True
                )
            ],
        ),
    ]


@pytest.mark.parametrize(
    "session_id",
    [".", "..", "a b", "a\nERROR forged", "\x00" * 100, "é", "x" * 129, "x" * HUGE],
    ids=["dot", "dotdot", "space", "newline", "nul", "unicode", "129", "15MB"],
)
def test_a_malformed_session_id_is_invalid_for_every_rpc_with_a_short_message(
    server: Server, plain_log: io.StringIO, session_id: str
) -> None:
    with (
        Client(server.address, timeout=60) as client,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.NormalizerStub(channel)
        canary = client.create_session(3, session_id="canary").session_id
        client.normalize(canary, torch.randn(4, 3))
        with unchanged(client, canary):
            expected = _expected(session_id)
            for method, request in _naming(session_id):
                with expect_status(INVALID, expected):
                    if method == "NormalizeStream":
                        list(stub.NormalizeStream(iter(request), timeout=60))
                    else:
                        getattr(stub, method)(request, timeout=60)
                assert len(expected) < 400
    assert until(lambda: plain_log.getvalue().count("INVALID_ARGUMENT") == 8)
    lines = plain_log.getvalue().splitlines()
    assert len(lines) == 8 and max(len(line) for line in lines) < 600


def test_a_later_chunk_naming_a_malformed_id_is_refused_briefly(server: Server) -> None:
    with (
        Client(server.address, timeout=60) as client,
        grpc.insecure_channel(server.address) as channel,
    ):
        sid = client.create_session(3).session_id
        x = tensor_to_proto(torch.randn(4, 3))
        requests = [
            pb.NormalizeStreamRequest(session_id=sid, mode=pb.MODE_TRAIN, chunk=x),
            pb.NormalizeStreamRequest(session_id="y" * HUGE, chunk=x, end_of_batch=True),
        ]
        with unchanged(client, sid), expect_status(INVALID, RULE + _shown("y" * HUGE)):
            list(pb_grpc.NormalizerStub(channel).NormalizeStream(iter(requests), timeout=60))


def test_other_client_text_is_echoed_short(server: Server) -> None:
    with (
        Client(server.address, timeout=60) as client,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.NormalizerStub(channel)
        sid = client.create_session(3).session_id
        with expect_status(INVALID, "page_token: not a token this server issued"):
            stub.ListSessions(pb.ListSessionsRequest(page_token="t" * HUGE), timeout=60)
        device = "cuda\n" * (HUGE // 5)
        with expect_status(
            INVALID,
            f"config.device: unknown device {device[:32]!r}... ({len(device)} chars); expected "
            "auto, cpu, cuda or cuda:N",
        ):
            config = pb.SessionConfig(num_features=3, device=device)
            stub.CreateSession(pb.CreateSessionRequest(config=config), timeout=60)
        name = "k\n" * (HUGE // 2)
        entry = pb.NamedTensor(name=name, tensor=tensor_to_proto(torch.ones(3)))
        with expect_status(
            INVALID,
            "entries[0].name: not a state_dict key (1-64 characters of [A-Za-z0-9_.]): "
            + _shown(name),
        ):
            stub.ImportState(pb.ImportStateRequest(session_id=sid, entries=[entry]), timeout=60)
