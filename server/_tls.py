"""Transport security: TLS credentials that follow rotated files, and protected mode.

TLS: ``--tls-cert``/``--tls-key`` (and ``--tls-client-ca`` for mutual TLS) are read and checked
at startup; a file that is missing, unreadable, not PEM, or a key that does not match its
certificate stops the server with a message naming the flag. grpc asks for the certificate
configuration at every new TLS handshake: the files are stat()ed then, re-read when they changed,
and used by new connections once they are a valid set again (a half-finished rotation keeps the
previous set). Connections already open keep theirs.

Protected mode (as in Redis): a server reachable from other hosts must authenticate its callers,
by tokens or by mutual TLS, unless ``--unsafe-expose-without-auth 1`` says otherwise.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import re
import socket
import ssl
import threading

import grpc

from normserve.server._settings import Settings

__all__ = [
    "TLSConfigError",
    "TLSFiles",
    "check_protected_mode",
    "is_loopback_address",
    "server_credentials",
]

log = logging.getLogger("normserve.server")

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.*?)-----END CERTIFICATE-----", re.S)


class TLSConfigError(ValueError):
    """A TLS file cannot be used; the message names the flag and the file (never its content)."""


def _no_password() -> bytes:
    # Without a callback, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise TLSConfigError("encrypted")


def _read(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise TLSConfigError(f"{flag}: cannot read {path}: {err.strerror or err}") from None


def _certificates(flag: str, path: str, data: bytes) -> list[bytes]:
    """The DER certificates of a PEM file; raises unless there is at least one and all parse."""
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise TLSConfigError(
            f"{flag}: {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        )
    try:
        ders = [base64.b64decode(b"".join(block.split()), validate=True) for block in blocks]
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(
            cadata=data.decode("ascii", "replace")
        )
    except (ValueError, ssl.SSLError):
        raise TLSConfigError(f"{flag}: {path} holds a certificate that does not parse") from None
    return ders


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, the form ``openssl x509 -fingerprint -sha256`` prints."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


_Signature = tuple[tuple[int, int, int], ...]


class TLSFiles:
    """The server's TLS files: ``load()`` reads and checks them (raising ``TLSConfigError``), and
    ``fetch`` is grpc's certificate-configuration fetcher: ``None`` (keep the current one) unless
    the files changed into a valid set since the last load."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._paths = tuple(p for p in (cert, key, client_ca) if p)
        self._lock = threading.Lock()
        self._loaded: _Signature | None = None
        self._rejected: _Signature | None = None
        self.fingerprint = ""

    def _signature(self) -> _Signature:
        # stat() follows links: Kubernetes swaps a secret's files by relinking a directory
        out = []
        for path in self._paths:
            st = os.stat(path)
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _read_all(self) -> tuple[bytes, bytes, bytes | None]:
        cert = _read("--tls-cert", self.cert)
        key = _read("--tls-key", self.key)
        ca = _read("--tls-client-ca", self.client_ca) if self.client_ca else None
        return cert, key, ca

    def _check(self, cert: bytes, key: bytes, ca: bytes | None) -> str:
        """Checks a set read from the files; returns the certificate's fingerprint."""
        ders = _certificates("--tls-cert", self.cert, cert)
        if b"PRIVATE KEY-----" not in key:
            raise TLSConfigError(f"--tls-key: {self.key} holds no PEM private key")
        if ca is not None:
            _certificates("--tls-client-ca", self.client_ca, ca)
        # ssl reads files only, not bytes: it checks the paths, and the caller reads them again to
        # make sure what was checked is what it holds
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(self.cert, self.key, password=_no_password)
        except TLSConfigError:
            raise TLSConfigError(
                f"--tls-key: {self.key} is encrypted; give the server an unencrypted key "
                "(readable by its user only), e.g. openssl pkey -in KEY -out KEY.plain"
            ) from None
        except ssl.SSLError as err:
            if err.reason == "KEY_VALUES_MISMATCH":
                raise TLSConfigError(
                    f"--tls-key: {self.key} is not the key of the certificate in {self.cert}"
                ) from None
            raise TLSConfigError(f"--tls-key: {self.key} holds a key that does not parse") from None
        except OSError as err:
            raise TLSConfigError(f"--tls-key: cannot read {self.key}: {err.strerror}") from None
        return fingerprint(ders[0])

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Reads and checks the files; raises ``TLSConfigError`` naming the flag at fault."""
        for _ in range(3):  # retried only while the files change under us (a rotation)
            signature = self._signature_or_raise()
            first = self._read_all()
            found = self._check(*first)
            if self._read_all() == first and self._signature_or_raise() == signature:
                break
        else:
            raise TLSConfigError("--tls-cert: the files kept changing while being read")
        cert, key, ca = first
        self._loaded, self.fingerprint = signature, found
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _signature_or_raise(self) -> _Signature:
        try:
            return self._signature()
        except OSError as err:
            flag = {self.cert: "--tls-cert", self.key: "--tls-key"}.get(
                err.filename, "--tls-client-ca"
            )
            raise TLSConfigError(f"{flag}: cannot read {err.filename}: {err.strerror}") from None

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's fetcher, called at each new TLS handshake (on a grpc thread): never raises."""
        with self._lock:
            try:
                signature = self._signature()
                if signature in (self._loaded, self._rejected):
                    return None
                config = self.load()
            except (OSError, TLSConfigError) as err:
                # a rotation in progress (one file replaced, not yet the other) or a bad file:
                # keep serving the current set, and say so once per state of the files
                try:
                    self._rejected = self._signature()
                except OSError:
                    self._rejected = None
                log.warning("TLS files changed but are not usable yet, kept the current: %s", err)
                return None
            except Exception:  # a bug must not break handshakes: grpc would refuse every one
                log.exception("TLS reload failed; kept the current certificate")
                return None
            self._rejected = None
            log.info("TLS: loaded the rotated certificate (sha256 %s)", self.fingerprint)
            return config


def server_credentials(settings: Settings) -> tuple[grpc.ServerCredentials | None, str]:
    """The server's credentials (``None``: plaintext) and a one-line description for the log.
    Raises ``TLSConfigError`` when the TLS flags are incomplete or their files unusable."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if not (cert or key or client_ca):
        return None, "plaintext"
    if not cert or not key:
        missing = "--tls-key" if cert else "--tls-cert"
        if not cert and not key:
            raise TLSConfigError(
                "--tls-client-ca: mutual TLS needs the server's own --tls-cert and --tls-key"
            )
        raise TLSConfigError(f"--tls-cert and --tls-key go together: {missing} is missing")
    files = TLSFiles(cert, key, client_ca)
    initial = files.load()
    credentials = grpc.dynamic_ssl_server_credentials(
        initial, files.fetch, require_client_authentication=bool(client_ca)
    )
    kind = "mutual TLS" if client_ca else "TLS"
    return credentials, f"{kind}, certificate sha256 {files.fingerprint}"


# ---- protected mode


def _host(address: str) -> str:
    host = address.rpartition(":")[0] if address.count(":") == 1 or "]" in address else address
    return host.strip("[]")


def _is_loopback_ip(text: str) -> bool:
    ip = ipaddress.ip_address(text.split("%")[0])  # (an IPv6 scope is no part of the address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def _resolve(host: str) -> list[str] | None:
    """The addresses a host name listens on; None when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None
    return [str(info[4][0]) for info in infos]


def is_loopback_address(address: str) -> bool:
    """Whether a listen address is reachable from this machine only: 127.0.0.0/8, ::1, localhost,
    a name that resolves to those only, or a Unix socket. An empty host, 0.0.0.0 and [::] listen
    on every interface; a name that does not resolve is not loopback."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = _host(address)
    if host.lower() == "localhost":
        return True
    try:
        return _is_loopback_ip(host)
    except ValueError:
        pass
    resolved = _resolve(host) if host else None
    return bool(resolved) and all(_is_loopback_ip(ip) for ip in resolved or ())


def check_protected_mode(settings: Settings, *, tokens: bool) -> bool:
    """Raises ``ValueError`` when the server would be reachable from other hosts with no way to
    authenticate its callers (``tokens``: whether tokens are configured); returns True when it
    runs so anyway, by the explicit flag."""
    if is_loopback_address(settings.address) or tokens or settings.tls_client_ca:
        return False
    host = _host(settings.address)
    if host and _resolve(host) is None:
        return False  # a name that does not resolve: nothing can listen there, the bind says so
    if settings.unsafe_expose_without_auth:
        return True
    tls_alone = " (TLS alone encrypts; it does not say who calls)" if settings.tls_cert else ""
    raise ValueError(
        f"--address: {settings.address} is reachable from other hosts, and nothing "
        f"authenticates callers{tls_alone} (protected mode). Either give tokens "
        "(--auth-tokens-file, or NORMSERVE_AUTH_TOKENS), or require client certificates "
        "(--tls-client-ca with --tls-cert/--tls-key), or listen on 127.0.0.1; "
        "--unsafe-expose-without-auth 1 serves every caller anyway"
    )
