"""TLS and mutual TLS, with certificates the tests make: the Python clients and the CLI over TLS,
the refusals (plaintext, no client certificate, another CA's), certificate rotation on disk while
the server runs, and the startup checks of the TLS flags."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization

from normserve.client import AsyncClient, Client, UnavailableError
from normserve.server import Settings, start_server
from tests.grpc._util import serving
from tests.security._certs import CA, make_ca, replace_file

CLI = [sys.executable, "-m", "normserve"]
# each new Client gets a connection of its own (a subchannel pool of its own), so that "a new
# connection" holds whatever grpc's rules for sharing connections between channels
FRESH = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[CA, CA]:
    base = tmp_path_factory.mktemp("pki")
    return make_ca(base / "a", "normserve test CA A"), make_ca(base / "b", "normserve test CA B")


def tls(ca: CA, client_ca: str = "") -> dict[str, str]:
    return {"tls_cert": ca.server, "tls_key": ca.server_key, "tls_client_ca": client_ca}


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMSERVE_")}
    return {**env, **extra}


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120, env=cli_env(**env)
    )


def refused(**client: Any) -> UnavailableError:
    """The error of a health check by a new client with these arguments (which must fail): one
    try (retry=0), not retries until the timeout."""
    client = {"retry": 0, **client}
    with Client(timeout=10, options=FRESH, **client) as c, pytest.raises(UnavailableError) as err:
        c.health()
    return err.value


def works(target: str, **client: Any) -> None:
    with Client(target, timeout=10, options=FRESH, **client) as c:
        assert c.health() == "SERVING"


# ---- TLS end to end


def test_python_clients_work_over_tls_and_metrics_stay_plain_http(pki: tuple[CA, CA]) -> None:
    a, _ = pki
    settings = Settings(
        address="127.0.0.1:0", metrics_address="127.0.0.1:0", device="cpu", **tls(a)
    )
    srv = start_server(settings)
    try:
        assert srv.transport_security.startswith("TLS, certificate sha256 ")
        x = torch.randn(16, 4)
        with Client(srv.address, ca_file=a.ca) as client:
            session = client.create_session(4, session_id="tls-sync")
            out = client.normalize(session.session_id, x).output
            want = torch.nn.functional.batch_norm(x, None, None, training=True)
            torch.testing.assert_close(out, want)
        # the certificate names localhost as well as 127.0.0.1
        with Client(f"localhost:{srv.port}", ca_file=a.ca) as client:
            assert client.get_session("tls-sync").num_batches_tracked == 1

        async def use_async() -> list[str]:
            async with AsyncClient(srv.address, ca_file=a.ca) as client:
                await client.normalize("tls-sync", x)
                return [s.session_id for s in await client.list_sessions()]

        assert asyncio.run(use_async()) == ["tls-sync"]
        # /metrics is plain HTTP on its own port, whatever the gRPC port does
        with urllib.request.urlopen(f"http://{srv.metrics_address}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert b"normserve_" in resp.read()
    finally:
        srv.stop(0)


def test_cli_over_tls_with_flags_and_environment(pki: tuple[CA, CA]) -> None:
    a, _ = pki
    with serving(**tls(a)) as srv:
        made = cli(
            "session", "create", "4", "--id", "by-cli", "--target", srv.address, "--ca-file", a.ca
        )
        assert (made.returncode, made.stdout, made.stderr) == (0, "by-cli\n", "")
        listed = cli("session", "list", "--target", srv.address, NORMSERVE_CA_FILE=a.ca)
        assert listed.returncode == 0, listed.stderr
        assert "by-cli" in listed.stdout
        health = cli("health", "--target", srv.address, NORMSERVE_CA_FILE=a.ca)
        assert (health.returncode, health.stdout) == (0, "SERVING\n")


# ---- refusals, and the hints that say what to check


def test_plaintext_client_to_tls_server_fails_with_a_hint(pki: tuple[CA, CA]) -> None:
    a, _ = pki
    with serving(**tls(a)) as srv:
        err = refused(target=srv.address)
        assert "Socket closed" in err.message
        assert "use --tls or --ca-file" in err.hint

        result = cli("health", "--target", srv.address)
        assert result.returncode == 1
        lines = result.stderr.splitlines()
        assert lines[0].startswith("normserve: UNAVAILABLE: failed to connect"), lines
        assert lines[1].startswith(f"normserve: hint: {srv.address} closed the connection"), lines
        assert "use --tls or --ca-file" in lines[1]

        # a client that does not trust the server's CA (here: the system's roots)
        err = refused(target=srv.address, tls=True)
        assert "CERTIFICATE_VERIFY_FAILED" in err.message
        assert err.hint.startswith(f"the certificate of {srv.address} is not signed by a CA")
        # and one trusting another CA
        err = refused(target=srv.address, ca_file=pki[1].ca)
        assert "pass the CA that signed it with --ca-file" in err.hint
        works(srv.address, ca_file=a.ca)  # none of that harmed the server


def test_tls_client_to_plaintext_server_fails_with_a_hint(pki: tuple[CA, CA]) -> None:
    with serving() as srv:
        err = refused(target=srv.address, ca_file=pki[0].ca)
        assert "WRONG_VERSION_NUMBER" in err.message
        assert err.hint.startswith(f"{srv.address} does not speak TLS: connect without --tls")


def test_garbage_on_the_tls_port_does_not_harm_the_server(pki: tuple[CA, CA]) -> None:
    a, _ = pki
    with serving(**tls(a)) as srv:
        for junk in (b"\x00" * 64, b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\xff\xff" + b"A" * 512):
            with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
                sock.sendall(junk)
                sock.settimeout(10)
                try:
                    while sock.recv(4096):
                        pass  # the server answers with an alert, then closes
                except (ConnectionResetError, TimeoutError):
                    pass  # (or resets, or waits for more: what matters is what follows)
        works(srv.address, ca_file=a.ca)


# ---- mutual TLS


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(pki: tuple[CA, CA]) -> None:
    a, b = pki
    with serving(**tls(a, client_ca=a.ca)) as srv:
        assert srv.transport_security.startswith("mutual TLS, ")
        no_cert = refused(target=srv.address, ca_file=a.ca)
        assert "--cert-file and --key-file" in no_cert.hint
        refused(target=srv.address, ca_file=a.ca, cert_file=b.client, key_file=b.client_key)
        refused(target=srv.address)  # plaintext
        with Client(srv.address, ca_file=a.ca, cert_file=a.client, key_file=a.client_key) as client:
            assert client.create_session(3, session_id="mtls").num_features == 3
            assert [s.session_id for s in client.list_sessions()] == ["mtls"]


# ---- rotation: new connections get the files on disk now, without a restart


@pytest.fixture
def live(pki: tuple[CA, CA], tmp_path: Path) -> Iterator[Path]:
    """A folder of the server's TLS files (A's to start with), to be replaced during a test."""
    a, _ = pki
    for name in ("server", "server_key", "ca"):
        shutil.copy(a.path(name), tmp_path / f"{name}.pem")
    yield tmp_path


def test_a_rotated_certificate_is_used_by_new_connections(
    pki: tuple[CA, CA], live: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pki
    cert, key = str(live / "server.pem"), str(live / "server_key.pem")
    with serving(tls_cert=cert, tls_key=key) as srv, Client(srv.address, ca_file=a.ca) as before:
        before.create_session(2, session_id="survives")

        replace_file(cert, b.server)
        replace_file(key, b.server_key)
        # a new connection sees B's certificate: trusting B alone works, trusting A alone fails
        with Client(srv.address, ca_file=b.ca, options=FRESH) as after:
            assert after.get_session("survives").num_features == 2  # the same server, same state
        err = refused(target=srv.address, ca_file=a.ca)
        assert "CERTIFICATE_VERIFY_FAILED" in err.message
        # the connection made before the rotation goes on
        assert before.get_session("survives").num_features == 2

        # half a rotation (A's certificate, B's key still there): the server keeps B's pair
        caplog.set_level(logging.WARNING, logger="normserve.server")
        replace_file(cert, a.server)
        works(srv.address, ca_file=b.ca)
        refused(target=srv.address, ca_file=a.ca)
        assert f"--tls-key: {key} is not the key of the certificate in {cert}" in caplog.text
        assert "PRIVATE KEY" not in caplog.text
        # ... until the key follows
        replace_file(key, a.server_key)
        works(srv.address, ca_file=a.ca)
        refused(target=srv.address, ca_file=b.ca)


def test_a_rotated_client_ca_decides_new_connections(pki: tuple[CA, CA], live: Path) -> None:
    a, b = pki
    client_ca = str(live / "ca.pem")
    with serving(**tls(a, client_ca=client_ca)) as srv:
        works(srv.address, ca_file=a.ca, cert_file=a.client, key_file=a.client_key)
        refused(target=srv.address, ca_file=a.ca, cert_file=b.client, key_file=b.client_key)
        replace_file(client_ca, b.ca)
        works(srv.address, ca_file=a.ca, cert_file=b.client, key_file=b.client_key)
        refused(target=srv.address, ca_file=a.ca, cert_file=a.client, key_file=a.client_key)


# ---- startup: a TLS flag that cannot work stops the server with one line naming it


def _encrypted_key(ca: CA, folder: Path) -> str:
    key = serialization.load_pem_private_key(Path(ca.server_key).read_bytes(), None)
    path = folder / "encrypted_key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret passphrase"),
        )
    )
    return str(path)


def test_unusable_tls_flags_stop_the_server_with_a_message(
    pki: tuple[CA, CA], tmp_path: Path
) -> None:
    a, b = pki
    missing = str(tmp_path / "missing.pem")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    cases: list[tuple[dict[str, str], str]] = [
        ({"tls_cert": a.server}, "--tls-cert and --tls-key go together: --tls-key is missing"),
        ({"tls_key": a.server_key}, "--tls-cert and --tls-key go together: --tls-cert is missing"),
        (
            {"tls_client_ca": a.ca},
            "--tls-client-ca: mutual TLS needs the server's own --tls-cert and --tls-key",
        ),
        (
            {"tls_cert": missing, "tls_key": a.server_key},
            f"--tls-cert: cannot read {missing}: No such file or directory",
        ),
        (
            {"tls_cert": a.server, "tls_key": str(tmp_path)},
            f"--tls-key: cannot read {tmp_path}: Is a directory",
        ),
        (
            {"tls_cert": a.server, "tls_key": b.server_key},
            f"--tls-key: {b.server_key} is not the key of the certificate in {a.server}",
        ),
        (
            {"tls_cert": a.server_key, "tls_key": a.server_key},
            f"--tls-cert: {a.server_key} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
        ),
        (
            {"tls_cert": a.server, "tls_key": a.server},
            f"--tls-key: {a.server} holds no PEM private key",
        ),
        (
            {"tls_cert": str(garbage), "tls_key": a.server_key},
            f"--tls-cert: {garbage} holds a certificate that does not parse",
        ),
        (
            {**tls(a), "tls_client_ca": a.server_key},
            f"--tls-client-ca: {a.server_key} holds no PEM certificate "
            "(-----BEGIN CERTIFICATE-----)",
        ),
        (
            {**tls(a), "tls_client_ca": missing},
            f"--tls-client-ca: cannot read {missing}: No such file or directory",
        ),
    ]
    encrypted = _encrypted_key(a, tmp_path)
    cases.append(
        (
            {"tls_cert": a.server, "tls_key": encrypted},
            f"--tls-key: {encrypted} is encrypted; give the server an unencrypted key (readable "
            "by its user only), e.g. openssl pkey -in KEY -out KEY.plain",
        )
    )
    key_body = Path(a.server_key).read_text().splitlines()[1]
    for flags, message in cases:
        with pytest.raises(ValueError) as err:
            start_server(Settings(address="127.0.0.1:0", metrics_address="off", **flags))
        assert str(err.value) == message, flags
        assert key_body not in str(err.value)


def test_the_server_command_reports_a_bad_tls_flag_in_one_line(pki: tuple[CA, CA]) -> None:
    a, b = pki
    run = subprocess.run(
        [
            *(sys.executable, "-m", "normserve.server", "--address", "127.0.0.1:0"),
            *("--metrics-address", "off", "--tls-cert", a.server, "--tls-key", b.server_key),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env(),
    )
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].endswith(
        f"normserve cannot start: --tls-key: {b.server_key} is not the key of the certificate "
        f"in {a.server}"
    )
