"""Unexpected errors: INTERNAL with a generic message and a request id; the cause only in the logs."""

from __future__ import annotations

import json
import logging

import grpc
import pytest
import torch

from normserve.client import Client, NormserveError
from normserve.server import Server
from normserve.server._logging import JsonFormatter
from normserve.server.service import Session

from ._util import until


def test_unexpected_error_is_internal_and_not_leaked(
    client: Client,
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sid = client.create_session(3).session_id

    def broken(self: Session, *args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals at 0xdeadbeef")

    monkeypatch.setattr(Session, "normalize", broken)
    with caplog.at_level(logging.INFO, logger="normserve"), pytest.raises(NormserveError) as info:
        client.normalize(sid, torch.randn(4, 3))
    err = info.value
    assert err.code is grpc.StatusCode.INTERNAL
    assert err.message.startswith("internal error; the server logged the cause (request id ")
    assert "secret" not in err.message
    records = [r for r in caplog.records if r.exc_info]
    assert records and "secret internals" in str(records[0].exc_info[1])
    request_id = err.message.rsplit(" ", 1)[1].rstrip(")")
    assert getattr(records[0], "request_id", None) == request_id
    monkeypatch.undo()
    assert client.normalize(sid, torch.randn(4, 3)).output.shape == (4, 3)  # still serving


def _logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """The records containing ``text``, once there are any (or after 5 s)."""

    def found() -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    until(lambda: bool(found()))
    return found()


def test_client_request_id_is_used(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    with grpc.insecure_channel(server.address) as channel:
        from normserve.v1 import normserve_pb2 as pb
        from normserve.v1 import normserve_pb2_grpc as pb_grpc

        stub = pb_grpc.NormalizerStub(channel)
        with caplog.at_level(logging.INFO, logger="normserve"):
            with pytest.raises(grpc.RpcError) as info:
                stub.GetSession(
                    pb.GetSessionRequest(session_id="nope"), metadata=(("x-request-id", "req-42"),)
                )
            (record,) = _logged(caplog, "NOT_FOUND")
    assert ("x-request-id", "req-42") in tuple(info.value.trailing_metadata())
    assert record.request_id == "req-42"
    assert "GetSession NOT_FOUND" in record.getMessage()


def test_json_log_lines() -> None:
    record = logging.LogRecord(
        "normserve.server", logging.ERROR, __file__, 1, "boom %s", ("x",), None
    )
    record.request_id = "abc"
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "boom x" and line["request_id"] == "abc" and line["level"] == "error"
    assert line["time"].endswith("Z")


def test_client_metadata_reaches_the_server(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    # the records are awaited inside at_level: a record logged after it has ended is dropped
    with caplog.at_level(logging.INFO, logger="normserve"):
        with (
            Client(server.address, metadata=[("x-tenant", "blue")]) as client,
            pytest.raises(NormserveError),
        ):
            client.get_session("nope", metadata=[("x-request-id", "from-client")])
        (record,) = _logged(caplog, "NOT_FOUND")
    assert record.request_id == "from-client"
