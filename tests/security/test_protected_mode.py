"""Protected mode: a server reachable from other hosts starts only when it authenticates its
callers (tokens or mutual TLS), or when --unsafe-expose-without-auth says so, loudly."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normserve.client import Client
from normserve.server import Settings, start_server
from normserve.server._tls import is_loopback_address
from tests.security._certs import CA, make_ca
from tests.security._process import ServerProcess

TOKEN = "4f0c1e1b2a9d8c7b6a5f4e3d2c1b0a99"

REFUSAL = (
    "--address: {address} is reachable from other hosts, and nothing authenticates callers "
    "(protected mode). Either give tokens (--auth-tokens-file, or NORMSERVE_AUTH_TOKENS), or "
    "require client certificates (--tls-client-ca with --tls-cert/--tls-key), or listen on "
    "127.0.0.1; --unsafe-expose-without-auth 1 serves every caller anyway"
)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CA:
    return make_ca(tmp_path_factory.mktemp("pki"), "normserve protected-mode CA")


@pytest.fixture(autouse=True)
def no_env_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NORMSERVE_AUTH_TOKENS", raising=False)


def env_without_normserve() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.10:50051", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("LOCALHOST:0", True),
        ("[::ffff:127.0.0.1]:50051", True),
        ("unix:/run/normserve.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        (":50051", False),
        ("10.1.2.3:50051", False),
        ("[2001:db8::1]:50051", False),
        ("normserve.internal:50051", False),
        ("127.0.0.1.example.com:50051", False),
    ],
)
def test_which_addresses_are_loopback(address: str, loopback: bool) -> None:
    assert is_loopback_address(address) is loopback


def settings(**kw: object) -> Settings:
    return Settings(**{"metrics_address": "off", "device": "cpu", **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0"])
def test_refuses_every_interface_without_auth(address: str) -> None:
    with pytest.raises(ValueError) as err:
        start_server(settings(address=address))
    assert str(err.value) == REFUSAL.format(address=address)


def test_tls_without_client_certificates_is_not_auth(ca: CA) -> None:
    with pytest.raises(ValueError) as err:
        start_server(settings(address="0.0.0.0:0", tls_cert=ca.server, tls_key=ca.server_key))
    assert "nothing authenticates callers (TLS alone encrypts; it does not say who calls)" in str(
        err.value
    )


def test_starts_with_a_tokens_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"team-a {TOKEN}\n")
    srv = start_server(settings(address="0.0.0.0:0", auth_tokens_file=str(tokens)))
    try:
        assert not srv.unprotected
        with Client(f"127.0.0.1:{srv.port}", token=TOKEN) as client:
            assert client.list_sessions() == []
    finally:
        srv.stop(0)


def test_starts_with_tokens_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NORMSERVE_AUTH_TOKENS", f"team-a {TOKEN}")
    srv = start_server(settings(address="0.0.0.0:0"))
    try:
        assert not srv.unprotected
    finally:
        srv.stop(0)


def test_starts_with_mutual_tls(ca: CA) -> None:
    srv = start_server(
        settings(
            address="0.0.0.0:0",
            tls_cert=ca.server,
            tls_key=ca.server_key,
            tls_client_ca=ca.ca,
        )
    )
    try:
        assert not srv.unprotected
        target = f"127.0.0.1:{srv.port}"
        with Client(target, ca_file=ca.ca, cert_file=ca.client, key_file=ca.client_key) as c:
            assert c.health() == "SERVING"
    finally:
        srv.stop(0)


def test_the_unsafe_flag_is_0_or_1() -> None:
    with pytest.raises(ValueError) as err:
        settings(unsafe_expose_without_auth=2).validate()
    assert str(err.value) == "--unsafe-expose-without-auth: expected 0 or 1, got 2"


def test_loopback_needs_no_auth_and_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="normserve.server")
    srv = start_server(settings(address="127.0.0.1:0", unsafe_expose_without_auth=1))
    srv.stop(0)
    assert not srv.unprotected
    assert "PROTECTED MODE" not in caplog.text


def test_the_server_command_refuses_in_one_line() -> None:
    run = subprocess.run(
        [
            *(sys.executable, "-m", "normserve", "serve", "--address", "0.0.0.0:0"),
            *("--metrics-address", "off", "--device", "cpu"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env_without_normserve(),
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].endswith("normserve cannot start: " + REFUSAL.format(address="0.0.0.0:0"))


def test_the_unsafe_flag_starts_it_with_a_loud_warning() -> None:
    with ServerProcess("--address", "0.0.0.0:0", "--unsafe-expose-without-auth", "1") as srv:
        port = srv.address.rpartition(":")[2]
        with Client(f"127.0.0.1:{port}") as client:
            assert client.list_sessions() == []  # anyone may: that is what the flag says
        warnings = [line for line in srv.log if " WARNING " in line]
    assert len(warnings) == 1, list(srv.log)
    flag = "PROTECTED MODE IS OFF (--unsafe-expose-without-auth 1)"
    assert f"{flag}: 0.0.0.0:{port} is reachable from other hosts" in warnings[0]
