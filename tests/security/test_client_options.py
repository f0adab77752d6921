"""The client side of security: what ``Client``/``AsyncClient``, ``RemoteBatchNorm*``, the CLI and
``normserve bench`` send (TLS, client certificates, ``authorization: Bearer``), and how they refuse
options that cannot work, without ever quoting a token."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from normserve.client import (
    AsyncClient,
    Client,
    NormserveError,
    RemoteBatchNorm1d,
)
from tests.grpc._util import serving
from tests.security._certs import CA, make_ca

TOKEN = "s3cr3t-t0ken-9f8e7d6c5b4a39281706"
CLI = [sys.executable, "-m", "normserve"]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(tmp_path_factory.mktemp("pki"), "normserve client-options CA")


class Recorder(grpc.GenericRpcHandler):
    """Answers every call UNIMPLEMENTED, after writing down its method and metadata."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str]]] = []

    def service(self, details: grpc.HandlerCallDetails) -> None:
        metadata = {k: v for k, v in details.invocation_metadata if isinstance(v, str)}  # type: ignore[attr-defined]
        self.calls.append((details.method, metadata))  # type: ignore[attr-defined]
        return None

    def auth(self) -> list[str | None]:
        return [md.get("authorization") for _, md in self.calls]


@pytest.fixture(params=["plaintext", "tls"])
def recorder(request: pytest.FixtureRequest, ca: CA) -> Iterator[tuple[Recorder, dict[str, Any]]]:
    """A server that records what clients send, and the client arguments that reach it."""
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[rec])
    if request.param == "tls":
        pair = (Path(ca.server_key).read_bytes(), Path(ca.server).read_bytes())
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
        client: dict[str, Any] = {"ca_file": ca.ca}
    else:
        port = server.add_insecure_port("127.0.0.1:0")
        client = {}
    server.start()
    yield rec, {"target": f"127.0.0.1:{port}", **client}
    server.stop(0)


def _each_kind_of_call(client: Client) -> None:
    for call in (
        client.health,
        lambda: client.get_session("s"),
        lambda: client.list_sessions(),
        lambda: client.normalize("s", torch.ones(4, 2)),
        lambda: list(client.normalize_stream("s", [torch.ones(4, 2)])),
    ):
        with pytest.raises(NormserveError) as err:
            call()
        assert err.value.code == grpc.StatusCode.UNIMPLEMENTED


def test_the_token_goes_with_every_call(recorder: tuple[Recorder, dict[str, Any]]) -> None:
    rec, args = recorder
    with Client(token=f"  {TOKEN}\n", metadata=[("x-team", "a")], **args) as client:
        _each_kind_of_call(client)
    assert len(rec.calls) == 5
    assert rec.auth() == [f"Bearer {TOKEN}"] * 5
    assert all(md["x-team"] == "a" for _, md in rec.calls)

    async def use_async() -> None:
        async with AsyncClient(token=TOKEN, **args) as client:
            with pytest.raises(NormserveError):
                await client.get_session("s")
            with pytest.raises(NormserveError):
                await client.normalize("s", torch.ones(4, 2))

    asyncio.run(use_async())
    assert rec.auth()[5:] == [f"Bearer {TOKEN}"] * 2


def test_no_token_no_authorization(recorder: tuple[Recorder, dict[str, Any]]) -> None:
    rec, args = recorder
    with Client(**args) as client, pytest.raises(NormserveError):
        client.get_session("s")
    assert rec.auth() == [None]


def test_remote_batchnorm_passes_the_connection_options_on(
    recorder: tuple[Recorder, dict[str, Any]],
) -> None:
    rec, args = recorder
    target = args.pop("target")
    with pytest.raises(NormserveError):  # the recorder answers create_session UNIMPLEMENTED
        RemoteBatchNorm1d(4, client=target, token=TOKEN, **args)
    assert rec.calls == [("/normserve.v1.Normalizer/CreateSession", rec.calls[0][1])]
    assert rec.auth() == [f"Bearer {TOKEN}"]


def test_remote_batchnorm_over_tls_with_a_client_certificate(ca: CA) -> None:
    tls = {"tls_cert": ca.server, "tls_key": ca.server_key, "tls_client_ca": ca.ca}
    with serving(**tls) as srv:
        bn = RemoteBatchNorm1d(
            3, client=srv.address, ca_file=ca.ca, cert_file=ca.client, key_file=ca.client_key
        )
        x = torch.randn(8, 3)
        torch.testing.assert_close(bn(x), torch.nn.BatchNorm1d(3)(x))
        bn.delete_session()
        with Client(srv.address, ca_file=ca.ca) as given, pytest.raises(ValueError) as err:
            RemoteBatchNorm1d(3, client=given, token=TOKEN)
        assert str(err.value) == (
            "tls, ca_file, cert_file, key_file and token configure the connection to a target: "
            "give them to the Client you pass, or pass its target instead"
        )


def test_options_that_cannot_work_are_refused(ca: CA, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {"cert_file": ca.client},
            "a client certificate goes with its key: key_file (--key-file) is missing",
        ),
        (
            {"key_file": ca.client_key},
            "a client certificate goes with its key: cert_file (--cert-file) is missing",
        ),
        (
            {"ca_file": missing},
            f"cannot read the CA file {missing}: No such file or directory",
        ),
        (
            {"ca_file": ca.client_key},
            f"the CA file {ca.client_key} holds no PEM certificate",
        ),
        (
            {"cert_file": ca.client_key, "key_file": ca.client_key},
            f"the certificate file {ca.client_key} holds no PEM certificate",
        ),
        (
            {"cert_file": ca.client, "key_file": ca.client},
            f"the key file {ca.client} holds no PEM private key",
        ),
        (
            {"tls": True, "credentials": grpc.ssl_channel_credentials()},
            "give either credentials or tls/ca_file/cert_file/key_file, not both",
        ),
        ({"token": " \n"}, "the token is empty"),
        (
            {"token": f"{TOKEN}\nx-forged: 1"},
            "the token has a character gRPC metadata cannot carry (printable ASCII only, no "
            "spaces or line breaks)",
        ),
        (
            {"token": f"{TOKEN}é"},
            "the token has a character gRPC metadata cannot carry (printable ASCII only, no "
            "spaces or line breaks)",
        ),
    ]
    for kwargs, message in cases:
        for cls in (Client, AsyncClient):
            with pytest.raises(ValueError) as err:
                cls("127.0.0.1:1", **kwargs)
            assert str(err.value) == message, kwargs
            assert TOKEN not in str(err.value)


# ---- the CLI and bench


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env={**clean, **env}
    )


def test_cli_token_from_a_file_or_the_environment(
    recorder: tuple[Recorder, dict[str, Any]], tmp_path: Path
) -> None:
    rec, args = recorder
    target = ["--target", args["target"]]
    tls = {"NORMSERVE_CA_FILE": args["ca_file"]} if "ca_file" in args else {}
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    other = tmp_path / "other"
    other.write_text("from-the-flag-0123456789\n")

    runs = [
        run("session", "list", *target, NORMSERVE_TOKEN=TOKEN, **tls),
        run("session", "list", *target, NORMSERVE_TOKEN_FILE=str(token_file), **tls),
        # the flag wins over both variables
        run(
            *("session", "show", "x", *target, "--token-file", str(other)),
            NORMSERVE_TOKEN=TOKEN,
            NORMSERVE_TOKEN_FILE=str(token_file),
            **tls,
        ),
        run("session", "list", *target, **tls),
    ]
    for done in runs:
        assert done.returncode == 1
        assert "UNIMPLEMENTED" in done.stderr
        assert TOKEN not in done.stderr + done.stdout
    assert rec.auth() == [
        f"Bearer {TOKEN}",
        f"Bearer {TOKEN}",
        "Bearer from-the-flag-0123456789",
        None,
    ]


def test_cli_refuses_unusable_security_options_in_one_line(tmp_path: Path, ca: CA) -> None:
    bad_token = tmp_path / "token"
    bad_token.write_text(f"{TOKEN} and more\n")
    missing = tmp_path / "missing"
    cases = [
        (
            ["--token-file", str(missing)],
            {},
            f"cannot read the token file {missing}: No such file or directory",
        ),
        (
            ["--token-file", str(bad_token)],
            {},
            f"the token file {bad_token}: the token has a character gRPC metadata cannot carry "
            "(printable ASCII only, no spaces or line breaks)",
        ),
        (
            [],
            {"NORMSERVE_TOKEN": f"{TOKEN}\tx"},
            "NORMSERVE_TOKEN: the token has a character gRPC metadata cannot carry (printable "
            "ASCII only, no spaces or line breaks)",
        ),
        (
            [],
            {"NORMSERVE_TLS": "maybe"},
            "NORMSERVE_TLS='maybe': expected 1 or 0 (true/false, yes/no, on/off)",
        ),
        (
            ["--cert-file", ca.client],
            {},
            "a client certificate goes with its key: key_file (--key-file) is missing",
        ),
    ]
    for flags, env, message in cases:
        done = run("session", "list", "--target", "127.0.0.1:1", *flags, **env)
        assert (done.returncode, done.stdout) == (1, ""), done
        assert done.stderr == f"normserve: {message}\n"
        assert TOKEN not in done.stderr


def test_cli_tls_from_the_environment(ca: CA) -> None:
    with serving(tls_cert=ca.server, tls_key=ca.server_key) as srv:
        done = run("health", "--target", f"localhost:{srv.port}", NORMSERVE_CA_FILE=ca.ca)
        assert (done.returncode, done.stdout) == (0, "SERVING\n")
        # NORMSERVE_TLS=1 alone trusts the system's roots, which do not hold the test CA
        done = run("health", "--target", srv.address, NORMSERVE_TLS="1")
        assert done.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in done.stderr
        # --no-tls overrides the variable: plaintext, which a TLS server closes
        done = run("health", "--target", srv.address, "--no-tls", NORMSERVE_TLS="1")
        assert done.returncode == 1 and "closed the connection" in done.stderr


def test_bench_over_mutual_tls_with_a_token(ca: CA, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"team-a {TOKEN}\n")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    tls = {"tls_cert": ca.server, "tls_key": ca.server_key, "tls_client_ca": ca.ca}
    with serving(auth_tokens_file=str(tokens), **tls) as srv:
        args = ["bench", "--target", srv.address, "--requests", "20", "--warmup", "0"]
        args += ["--shape", "8,4", "--json", "-", "--quiet"]
        security = ["--cert-file", ca.client, "--key-file", ca.client_key]
        done = run(*args, *security, "--token-file", str(token_file), NORMSERVE_CA_FILE=ca.ca)
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert (result["summary"]["count"], result["summary"]["errors"]) == (20, {})
        config = result["config"]
        assert (config["tls"], config["client_certificate"], config["token"]) == (True, True, True)
        assert TOKEN not in done.stdout + done.stderr
        # the same without the token: refused before anything is measured
        done = run(*args, *security, NORMSERVE_CA_FILE=ca.ca)
        assert done.returncode == 1
        assert "UNAUTHENTICATED" in done.stdout
