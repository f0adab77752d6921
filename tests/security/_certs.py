"""Certificates for the TLS tests, made by the ``cryptography`` package: two independent CAs, each
with a server certificate (SAN localhost and 127.0.0.1) and a client certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CA", "make_ca", "replace_file"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class CA:
    """A CA in ``folder``: ``ca`` (its certificate), ``server``/``server_key`` and
    ``client``/``client_key`` (paths to PEM files), and ``serial`` of the server certificate."""

    folder: Path
    name: str
    server_serial: int

    def path(self, what: str) -> str:
        return str(self.folder / f"{what}.pem")

    @property
    def ca(self) -> str:
        return self.path("ca")

    @property
    def server(self) -> str:
        return self.path("server")

    @property
    def server_key(self) -> str:
        return self.path("server_key")

    @property
    def client(self) -> str:
        return self.path("client")

    @property
    def client_key(self) -> str:
        return self.path("client_key")


def make_ca(folder: Path, name: str) -> CA:
    """A fresh CA and its leaf certificates, written as PEM files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, server: bool) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .subject_name(_name(common_name))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(f"{name} server", server=True)
    client_cert, client_key = leaf(f"{name} client", server=False)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (folder / "server.pem").write_bytes(server_cert.public_bytes(pem))
    (folder / "server_key.pem").write_bytes(_key_pem(server_key))
    (folder / "client.pem").write_bytes(client_cert.public_bytes(pem))
    (folder / "client_key.pem").write_bytes(_key_pem(client_key))
    return CA(folder, name, server_cert.serial_number)


def replace_file(path: str, source: str) -> None:
    """Replaces ``path`` with ``source``'s bytes in one step (write aside, rename), as a
    certificate manager does."""
    data = Path(source).read_bytes()
    aside = Path(path + ".new")
    aside.write_bytes(data)
    aside.replace(path)
