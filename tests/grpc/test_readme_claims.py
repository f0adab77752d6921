"""What the README promises and no other test checked, through real gRPC: the session and
concurrent-call limits, ``allow_non_finite``, ``NORMSERVE_*`` settings, JSON logs, and EVAL calls
that never wait."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from normserve.client import Client, NotFoundError
from normserve.server import Server, Settings
from normserve.v1 import normserve_pb2 as pb
from normserve.v1 import normserve_pb2_grpc as pb_grpc

from ._util import expect_status, serving, tensor, unchanged, until

RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def _create(stub: pb_grpc.NormalizerStub, session_id: str = "", c: int = 2) -> str:
    req = pb.CreateSessionRequest(session_id=session_id, config=pb.SessionConfig(num_features=c))
    return stub.CreateSession(req, timeout=10).session.session_id


def _chunk(sid: str, mode: int, x: torch.Tensor, end: bool) -> pb.NormalizeStreamRequest:
    return pb.NormalizeStreamRequest(session_id=sid, mode=mode, chunk=tensor(x), end_of_batch=end)


def _array(t: pb.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(t.data), dtype=torch.float32).view(list(t.shape))


# ---- limits: `--max-sessions`, `--max-concurrent-rpcs`


def test_max_sessions_refuses_one_more_with_resource_exhausted() -> None:
    with serving(max_sessions=2) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = pb_grpc.NormalizerStub(channel)
        _create(stub, "a")
        _create(stub)  # a server-chosen id counts the same
        full = "this server holds its maximum of 2 sessions (--max-sessions); delete some"
        with expect_status(RESOURCE_EXHAUSTED, full):
            _create(stub, "c")
        with expect_status(RESOURCE_EXHAUSTED, full):
            _create(stub)
        listed = stub.ListSessions(pb.ListSessionsRequest(), timeout=10).sessions
        assert len(listed) == 2 and "c" not in {s.session_id for s in listed}
        stub.DeleteSession(pb.DeleteSessionRequest(session_id="a"), timeout=10)
        assert _create(stub, "c") == "c"  # the limit counts live sessions, not creations


def test_max_concurrent_rpcs_refuses_a_call_beyond_the_limit() -> None:
    """With ``max_concurrent_rpcs=1`` and one stream in flight (its EVAL batch half sent and its
    first chunk answered, so the server is certainly running it), any other call is refused."""
    with serving(max_concurrent_rpcs=1) as srv:
        with Client(srv.address, timeout=10) as client:
            sid = client.create_session(2).session_id
        release = threading.Event()

        def held_batch() -> Iterator[pb.NormalizeStreamRequest]:
            yield _chunk(sid, pb.MODE_EVAL, torch.randn(3, 2), end=False)
            release.wait(10)
            yield pb.NormalizeStreamRequest(chunk=tensor(torch.randn(3, 2)), end_of_batch=True)

        with (
            grpc.insecure_channel(srv.address) as first,
            grpc.insecure_channel(srv.address) as second,
        ):
            call = pb_grpc.NormalizerStub(first).NormalizeStream(held_batch(), timeout=10)
            stub = pb_grpc.NormalizerStub(second)
            try:
                assert not next(call).end_of_batch  # the stream is in flight
                with expect_status(RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"):
                    stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5)
                with expect_status(RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"):
                    _create(stub)
            finally:
                release.set()
            assert [a.end_of_batch for a in call] == [True]

            def admitted() -> bool:
                try:
                    stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=5)
                except grpc.RpcError as err:
                    assert err.code() == RESOURCE_EXHAUSTED, err
                    return False
                return True

            assert until(admitted), "calls were still refused after the stream ended"


# ---- allow_non_finite


def _non_finite(c: int = 3) -> torch.Tensor:
    x = torch.randn(6, c, 4)
    x[1, 1, 2] = float("nan")
    x[4, 2, 0] = float("inf")
    return x


def test_allow_non_finite_session_takes_nan_and_inf_like_torch(client: Client) -> None:
    """The session normalizes what torch would (channels holding NaN/Inf come out NaN, the others
    are untouched by them) and keeps the running statistics torch keeps."""
    sid = client.create_session(3, allow_non_finite=True).session_id
    assert client.get_session(sid).allow_non_finite
    bn = torch.nn.BatchNorm1d(3)
    x = _non_finite()
    train = client.normalize(sid, x)
    assert train.version == 2
    torch.testing.assert_close(train.output, bn(x).detach(), equal_nan=True)
    assert train.output[:, 0].isfinite().all() and train.output[:, 1:].isnan().all()
    info = client.get_session(sid)
    assert info.num_batches_tracked == 1
    torch.testing.assert_close(info.running_mean, bn.running_mean, equal_nan=True)
    torch.testing.assert_close(info.running_var, bn.running_var, equal_nan=True)
    fresh = client.create_session(3, allow_non_finite=True).session_id
    ref = torch.nn.BatchNorm1d(3).eval()
    evaluated = client.normalize(fresh, x, mode="eval")
    assert evaluated.version == 1  # EVAL changes nothing
    torch.testing.assert_close(evaluated.output, ref(x).detach(), equal_nan=True)


def test_without_allow_non_finite_nan_is_invalid_argument_and_changes_nothing(
    client: Client, stub: pb_grpc.NormalizerStub
) -> None:
    sid = client.create_session(3).session_id
    client.normalize(sid, torch.randn(8, 3, 4))  # running statistics that must stay as they are
    x = _non_finite()
    with unchanged(client, sid):
        with expect_status(
            INVALID_ARGUMENT,
            "input: contains NaN or Inf, or values whose statistics exceed float32's range "
            "(|mean| or variance > 3.4e38); nothing was applied",
        ):
            stub.Normalize(pb.NormalizeRequest(session_id=sid, mode=pb.MODE_TRAIN, input=tensor(x)))
        with expect_status(INVALID_ARGUMENT, "input: contains NaN or Inf; nothing was applied"):
            stub.Normalize(pb.NormalizeRequest(session_id=sid, mode=pb.MODE_EVAL, input=tensor(x)))


# ---- NORMSERVE_* environment variables


def _other_value(f: dataclasses.Field[Any]) -> tuple[str, Any]:
    """A value unlike the default for a Settings field: as the environment spells it, and parsed."""
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    if kind == "int":
        return str(f.default + 3), f.default + 3
    if kind == "float":
        return str(f.default + 0.25), f.default + 0.25
    if kind == "str":
        return f"x{f.default}", f"x{f.default}"
    raise AssertionError(f"Settings.{f.name}: no NORMSERVE_* parsing rule checked for {kind}")


def test_every_setting_is_read_from_its_normserve_variable() -> None:
    fields = dataclasses.fields(Settings)
    assert {"max_sessions", "grace_seconds", "log_format"} <= {f.name for f in fields}
    env = {"PATH": "/bin", "NORMSERVE_NOT_A_SETTING": "ignored"}
    want: dict[str, Any] = {}
    for f in fields:
        env[f"NORMSERVE_{f.name.upper()}"], want[f.name] = _other_value(f)
    got = Settings.from_env(env)
    for name, value in want.items():
        assert getattr(got, name) == value and type(getattr(got, name)) is type(value), name
    assert Settings.from_env(env, workers=5).workers == 5  # flags (overrides) beat the environment
    assert Settings.from_env({}) == Settings()


def test_specific_normserve_variables_parse_to_their_types() -> None:
    s = Settings.from_env(
        {
            "NORMSERVE_MAX_SESSIONS": "7",
            "NORMSERVE_GRACE_SECONDS": "2.5",
            "NORMSERVE_DEVICE": "cpu",
            "NORMSERVE_LOG_FORMAT": "json",
        }
    )
    assert (s.max_sessions, s.grace_seconds, s.device, s.log_format) == (7, 2.5, "cpu", "json")
    assert s.workers == Settings().workers


@pytest.mark.parametrize(
    ("name", "raw", "kind"),
    [("NORMSERVE_WORKERS", "sixteen", "int"), ("NORMSERVE_GRACE_SECONDS", "soon", "float")],
)
def test_a_bad_normserve_variable_is_a_clear_error(name: str, raw: str, kind: str) -> None:
    with pytest.raises((SystemExit, ValueError)) as info:
        Settings.from_env({name: raw})
    assert str(info.value) == f"{name}={raw!r}: expected {kind}"


def test_normserve_variable_reaches_the_server() -> None:
    with (
        serving(
            max_sessions=Settings.from_env({"NORMSERVE_MAX_SESSIONS": "1"}).max_sessions
        ) as srv,
        grpc.insecure_channel(srv.address) as channel,
    ):
        stub = pb_grpc.NormalizerStub(channel)
        _create(stub)
        with expect_status(
            RESOURCE_EXHAUSTED,
            "this server holds its maximum of 1 sessions (--max-sessions); delete some",
        ):
            _create(stub)


# ---- JSON logs


def test_serve_logs_json_lines_and_exits_0_on_sigterm() -> None:
    """``normserve serve --log-format json``: every stderr line is one JSON object with the
    documented keys; a call's line carries the client's request id; SIGTERM drains and exits 0."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "normserve.server"),
            *("--address", "127.0.0.1:0", "--metrics-address", "off", "--device", "cpu"),
            *("--log-format", "json", "--grace-seconds", "5"),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stderr is not None
    try:
        first = proc.stderr.readline()
        match = re.search(r"listening on (\S+)", first)
        assert match, f"no address in the first line: {first!r}"
        with (
            Client(match.group(1), timeout=10) as client,
            pytest.raises(NotFoundError, match="session 'nope' not found"),
        ):
            client.get_session("nope", metadata=[("x-request-id", "json-log-1")])
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=45)  # generous: a loaded CI machine is slow to exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    lines = [first, *rest.splitlines()]
    records = []
    for line in lines:
        record = json.loads(line)
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message", "request_id"} <= record.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), line
        records.append(record)
    assert records[0]["level"] == "info" and records[0]["logger"].startswith("normserve")
    (call,) = [r for r in records if "NOT_FOUND" in r["message"]]
    assert call["request_id"] == "json-log-1"
    assert "GetSession" in call["message"]
    assert any("SIGTERM" in r["message"] for r in records)


# ---- EVAL calls never wait


def test_eval_does_not_wait_for_a_train_batch_in_progress() -> None:
    """A chunked TRAIN batch whose end never comes (until the EVAL has returned) holds nothing an
    EVAL on the same session needs: the EVAL answers at once, with the state before the batch."""
    registry = CollectorRegistry()
    with serving(registry) as srv, Client(srv.address, timeout=5) as client:
        sid = client.create_session(4).session_id
        client.normalize(sid, torch.randn(16, 4) * 3 + 1)
        state = client.export_state(sid)
        release = threading.Event()
        train = torch.randn(10, 4) * 2 - 1

        def unfinished_batch() -> Iterator[pb.NormalizeStreamRequest]:
            yield _chunk(sid, pb.MODE_TRAIN, train[:6], end=False)
            release.wait(10)
            yield pb.NormalizeStreamRequest(chunk=tensor(train[6:]), end_of_batch=True)

        def received() -> float:
            labels = {"method": "NormalizeStream"}
            return registry.get_sample_value("normserve_received_bytes_total", labels) or 0.0

        with grpc.insecure_channel(srv.address) as channel:
            call = pb_grpc.NormalizerStub(channel).NormalizeStream(unfinished_batch(), timeout=10)
            try:
                assert until(lambda: received() > 0), "the first chunk never reached the server"
                x = torch.randn(8, 4)
                evaluated = client.normalize(sid, x, mode="eval", timeout=3)
            finally:
                release.set()
            answers = list(call)
        assert evaluated.version == 2 and not evaluated.batch_statistics
        ref = torch.nn.BatchNorm1d(4)
        ref.load_state_dict(state)
        torch.testing.assert_close(evaluated.output, ref.eval()(x).detach())
        assert answers[0].version == 3  # the TRAIN batch was applied after all, once
        ref.train()(train)
        torch.testing.assert_close(client.get_session(sid).running_var, ref.running_var)


def test_eval_calls_do_not_wait_for_each_other(client: Client, server: Server) -> None:
    """Two EVAL batches held open on the same session (each has had its first chunk answered), and
    a unary EVAL still answers; then both held batches finish."""
    sid = client.create_session(3).session_id
    client.normalize(sid, torch.randn(16, 3) + 2)
    release = threading.Event()

    def held_batch() -> Iterator[pb.NormalizeStreamRequest]:
        yield _chunk(sid, pb.MODE_EVAL, torch.randn(2, 3), end=False)
        release.wait(10)
        yield pb.NormalizeStreamRequest(chunk=tensor(torch.randn(2, 3)), end_of_batch=True)

    with grpc.insecure_channel(server.address) as a, grpc.insecure_channel(server.address) as b:
        calls = [
            pb_grpc.NormalizerStub(ch).NormalizeStream(held_batch(), timeout=5) for ch in (a, b)
        ]
        try:
            firsts = [next(call) for call in calls]  # both batches are being served at once
            assert [f.version for f in firsts] == [2, 2]
            assert client.normalize(sid, torch.randn(4, 3), mode="eval", timeout=3).version == 2
        finally:
            release.set()
        assert [[a.end_of_batch for a in call] for call in calls] == [[True], [True]]
    torch.testing.assert_close(_array(firsts[0].mean), client.get_session(sid).running_mean)
