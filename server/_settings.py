"""The server's one settings object: every field documented once, read from flags and NORMSERVE_*."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from normserve.server.service import ANSWER_OVERHEAD_BYTES, max_features_for

__all__ = ["Settings"]


#: --snapshot-interval's default (a different value without --state-dir is refused)
_SNAPSHOT_INTERVAL = 5.0


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Settings:
    """How a normserve server runs. ``NORMSERVE_<FIELD>`` environment variables set the defaults,
    command-line flags (``--field-name``) override them."""

    address: str = _opt(
        "127.0.0.1:50051",
        "host:port the gRPC server binds; port 0 picks a free one. Use 0.0.0.0:50051 to serve "
        "other hosts (the container image does).",
    )
    device: str = _opt(
        "auto", "default device for sessions: auto (cuda if present, else cpu), cpu, cuda, cuda:N"
    )
    workers: int = _opt(
        16,
        "threads that run tensor work; calls waiting for the network (idle streams, slow "
        "senders) hold none",
    )
    max_concurrent_rpcs: int = _opt(
        4096,
        "calls in flight, open streams included, before new ones get RESOURCE_EXHAUSTED (0: no "
        "limit). A call waiting for its client holds no thread, only its buffers, so the bound "
        "is on memory, not on workers",
    )
    max_message_bytes: int = _opt(
        16 * 1024 * 1024,
        "largest gRPC message accepted or sent; larger batches must be streamed in chunks",
    )
    max_sessions: int = _opt(10_000, "sessions this server holds at most")
    max_features: int = _opt(
        0,
        "largest num_features of a session (0: the most whose session still fits one message, "
        "(max-message-bytes - 4096) / 16, ~1M at 16 MiB)",
    )
    stream_idle_timeout: float = _opt(
        60.0,
        "seconds a NormalizeStream may send nothing before it is ended with DEADLINE_EXCEEDED "
        "and its partial batch discarded (0: never)",
    )
    keepalive_seconds: float = _opt(
        30.0,
        "HTTP/2 keepalive ping interval; a peer that does not answer within 10 s is dropped, and "
        "its calls end (so a vanished client frees its streams)",
    )
    max_connection_idle_seconds: float = _opt(
        300.0, "a connection with no call for this long is closed (clients reconnect on demand)"
    )
    max_connection_age_seconds: float = _opt(
        0.0,
        "connections are closed after this long, letting calls in flight finish within a "
        "further grace of the same length (0: no limit); set it behind a load balancer so "
        "clients spread over new replicas",
    )
    grace_seconds: float = _opt(
        10.0, "on SIGTERM/SIGINT, how long calls in flight may take to finish"
    )
    metrics_address: str = _opt(
        "127.0.0.1:9464",
        "host:port serving Prometheus /metrics (port 0 picks one; 'off' disables). The container "
        "image uses 0.0.0.0:9464.",
    )
    torch_threads: int = _opt(
        1,
        "torch intra-op threads per call (0: torch's default, one per core). 1 by default: the "
        "server runs many calls at once, and intra-op worker threads that spin between kernels "
        "steal the cores gRPC needs",
    )
    malloc_tuning: int = _opt(
        1,
        "1: keep large buffers in glibc's heap (mmap threshold 64 MiB, trim threshold 512 MiB). "
        "By default glibc maps and unmaps every buffer over 128 KiB, so each streamed chunk pays "
        "page faults on its fresh memory (measured: L TRAIN streams 98 -> 77 ms); and once streams "
        "have given back 64 MiB of buffers, return the heap's free memory to the OS (malloc_trim). "
        "0: glibc's defaults, no trimming",
    )
    # ---- state: where sessions are kept, how long, and how many processes serve them
    # (docs/deployment.md)
    store: str = _opt(
        "memory",
        "where sessions are kept: memory (this process; lost when it ends, or kept in files with "
        "--state-dir), or redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS): every process and "
        "replica pointed at the same Redis serves the same sessions, each update applied once. "
        "A password belongs in NORMSERVE_STORE, not the flag (flags show in ps)",
    )
    state_dir: str = _opt(
        "",
        "directory that keeps the sessions across restarts (the local durable store, for one "
        "server: a lock file refuses a second). See --durability",
    )
    durability: str = _opt(
        "interval",
        "with --state-dir: interval (a snapshot every --snapshot-interval seconds and on "
        "shutdown; SIGKILL or power loss loses at most the last interval) or strict (an update is "
        "answered only once it is on disk, fsynced; concurrent updates share one fsync)",
    )
    snapshot_interval: float = _opt(
        _SNAPSHOT_INTERVAL,
        "with --state-dir: seconds between snapshots (strict: between log checkpoints)",
    )
    session_ttl: float = _opt(
        -1.0,
        "idle seconds after which a session that sets no ttl_seconds of its own expires and is "
        "deleted (0: never; -1: 86400 with the memory store, never with --state-dir or Redis)",
    )
    idempotency_keys: int = _opt(
        1000, "idempotency keys each session remembers (the most recent; retries older are applied)"
    )
    idempotency_window: float = _opt(
        3600.0, "seconds a session remembers an idempotency key at most"
    )
    processes: int = _opt(
        1,
        "server processes sharing --address (SO_REUSEPORT; the kernel spreads connections over "
        "them); more than 1 needs --store redis://. Process i serves metrics on the metrics "
        "port + i",
    )
    # ---- security: transport, identity, and limits that hold under abuse (docs/security.md)
    tls_cert: str = _opt(
        "",
        "PEM certificate chain: serve TLS (with --tls-key). The files are re-read when they "
        "change, so a rotated certificate is used by new connections without a restart. The "
        "metrics port stays plain HTTP",
    )
    tls_key: str = _opt("", "PEM private key of --tls-cert")
    tls_client_ca: str = _opt(
        "",
        "PEM CA bundle: require client certificates signed by it (mutual TLS); re-read when it "
        "changes",
    )
    auth_tokens_file: str = _opt(
        "",
        "file of bearer tokens, one 'TENANT TOKEN' per line ('#' comments; a token is 16-4096 "
        "visible ASCII characters, e.g. from 'openssl rand -hex 32'): callers must send "
        "'authorization: Bearer TOKEN' and act as its tenant. Re-read when it changes. The same "
        "lines may come from the environment variable NORMSERVE_AUTH_TOKENS instead (never a flag: "
        "flags show in ps)",
    )
    unsafe_expose_without_auth: int = _opt(
        0,
        "1: allow a non-loopback --address with neither tokens nor mutual TLS (protected mode "
        "refuses to start otherwise): anyone who reaches the port can read, change and delete "
        "every session",
    )
    quota_sessions: int = _opt(1000, "sessions per tenant (0: no limit)")
    quota_session_bytes: int = _opt(
        1 << 30,
        "bytes of session state (running statistics, affine parameters) per tenant (0: no limit)",
    )
    quota_streams: int = _opt(256, "open NormalizeStream calls per tenant (0: no limit)")
    quota_inflight_bytes: int = _opt(
        512 << 20,
        "bytes of a tenant's Normalize requests and stream chunks being decoded or computed at "
        "once (0: no limit); what streams hold of unfinished batches is bounded by "
        "--max-stream-buffer-bytes",
    )
    quota_rps: float = _opt(
        10_000.0,
        "requests per second per tenant, a token bucket of one second's burst (0: no limit)",
    )
    max_stream_buffer_bytes: int = _opt(
        256 << 20,
        "bytes one NormalizeStream may hold of a batch not yet complete: the chunks a batch that "
        "needs its own statistics keeps until its answer is sent (each counted as its data, at "
        "least 1 KiB). A chunk past it ends the stream with RESOURCE_EXHAUSTED, nothing of the "
        "batch applied, its buffers freed (0: no limit)",
    )
    max_total_stream_buffer_bytes: int = _opt(
        1 << 30,
        "bytes all streams together may hold of batches not yet complete; a chunk past it ends "
        "its stream with RESOURCE_EXHAUSTED, retry later (0: no limit)",
    )
    log_level: str = _opt("info", "debug, info, warning or error")
    log_format: str = _opt("plain", "plain or json (one JSON object per line)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then NORMSERVE_* variables, then ``overrides``."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(f"NORMSERVE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(f, raw)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One ``--flag`` per field; unset flags leave the env/default value."""
        for f in fields(cls):
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                type=_type(f),
                default=None,
                help=f"{f.metadata['help']} (env NORMSERVE_{f.name.upper()}; default: {f.default})",
            )

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None
    ) -> Settings:
        given = {f.name: getattr(args, f.name) for f in fields(cls)}
        return cls.from_env(environ, **{k: v for k, v in given.items() if v is not None})

    def validate(self) -> None:
        """Raises ValueError naming the first flag whose value cannot work."""
        _check_host_port("--address", self.address)
        if self.metrics_address not in ("", "off"):
            _check_host_port("--metrics-address", self.metrics_address, " or off")
        positive = {"workers": self.workers, "max_message_bytes": self.max_message_bytes}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
        if self.grace_seconds < 0:
            raise ValueError(f"--grace-seconds: must be >= 0, got {self.grace_seconds}")
        for name in (
            "max_concurrent_rpcs",
            "max_sessions",
            "torch_threads",
            "max_features",
            "stream_idle_timeout",
            "keepalive_seconds",
            "max_connection_idle_seconds",
            "max_connection_age_seconds",
            "quota_sessions",
            "quota_session_bytes",
            "quota_streams",
            "quota_inflight_bytes",
            "quota_rps",
            "max_stream_buffer_bytes",
            "max_total_stream_buffer_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 0")
        if self.max_message_bytes < 2 * ANSWER_OVERHEAD_BYTES:
            raise ValueError(f"--max-message-bytes: must be >= {2 * ANSWER_OVERHEAD_BYTES}")
        if self.max_features > max_features_for(self.max_message_bytes):
            raise ValueError(
                f"--max-features: at most {max_features_for(self.max_message_bytes)} with "
                f"--max-message-bytes {self.max_message_bytes} (a session of more could not be "
                "read or exported in one message)"
            )
        if self.log_format not in ("plain", "json"):
            raise ValueError(f"--log-format: expected plain or json, got {self.log_format!r}")
        if self.store != "memory" and not self.store.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"--store: expected memory or redis://HOST:PORT/DB, got {_redacted(self.store)!r}"
            )
        if self.store.startswith(("redis://", "rediss://")):
            db = urlsplit(self.store).path.strip("/")
            if db and not db.isdigit():
                raise ValueError(
                    f"--store: the database of redis://HOST:PORT/DB is a number, got {db!r}"
                )
        if self.state_dir and self.store != "memory":
            raise ValueError("--state-dir and --store redis://... exclude each other")
        if self.durability not in ("interval", "strict"):
            raise ValueError(f"--durability: expected interval or strict, got {self.durability!r}")
        if not self.snapshot_interval > 0:
            raise ValueError(f"--snapshot-interval: must be > 0, got {self.snapshot_interval}")
        if not self.state_dir and (
            self.durability != "interval" or self.snapshot_interval != _SNAPSHOT_INTERVAL
        ):
            given = "--durability" if self.durability != "interval" else "--snapshot-interval"
            raise ValueError(
                f"{given}: applies to the local durable store only: give --state-dir DIR (without "
                "it, sessions are kept in memory"
                + (" or in Redis" if self.store != "memory" else "")
                + " and nothing is written to disk)"
            )
        if self.session_ttl < 0 and self.session_ttl != -1:
            raise ValueError(f"--session-ttl: must be >= 0, or -1, got {self.session_ttl}")
        if self.idempotency_keys < 1 or not self.idempotency_window > 0:
            raise ValueError("--idempotency-keys and --idempotency-window: must be > 0")
        if self.processes < 1:
            raise ValueError(f"--processes: must be >= 1, got {self.processes}")
        if self.processes > 1 and self.store == "memory":
            held = (
                "--state-dir is one process's store"
                if self.state_dir
                else (
                    "with the memory store each process would hold sessions the others cannot see"
                )
            )
            raise ValueError(
                "--processes: more than one process needs a shared store (--store "
                f"redis://HOST:PORT/DB); {held}"
            )
        if (unsafe := self.unsafe_expose_without_auth) not in (0, 1):
            raise ValueError(f"--unsafe-expose-without-auth: expected 0 or 1, got {unsafe}")

    def store_description(self) -> str:
        """Where sessions are kept, as a log line says it (never with a password)."""
        if self.state_dir:
            return f"sessions in {self.state_dir} ({self.durability})"
        if self.store == "memory":
            return "sessions in memory"
        return f"sessions in {_redacted(self.store)}"

    def default_session_ttl(self) -> float:
        """--session-ttl resolved: -1 is a day for the memory store, never for durable ones."""
        if self.session_ttl != -1:
            return self.session_ttl
        return 86400.0 if self.store == "memory" and not self.state_dir else 0.0

    def session_max_features(self) -> int:
        """--max-features, or the most whose session fits one message."""
        return self.max_features or max_features_for(self.max_message_bytes)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _redacted(url: str) -> str:
    """A store URL as a message may show it: without its password."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def _check_host_port(flag: str, address: str, alternatives: str = "") -> None:
    """``host:port`` with a port in 0-65535 (gRPC would wrap a larger one around, or take a missing
    one for 443)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host.strip("[]"):
        raise ValueError(
            f"{flag}: expected host:port{alternatives} (e.g. 127.0.0.1:50051), got {address!r}"
        )
    if int(port) > 65535:
        raise ValueError(f"{flag}: port must be 0-65535 (0 picks a free one), got {port}")


def _type(f: dataclasses.Field[Any]) -> Any:
    return {"int": int, "float": float}.get(str(f.type), str)


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    try:
        return _type(f)(raw)
    except ValueError:
        raise SystemExit(f"NORMSERVE_{f.name.upper()}={raw!r}: expected {f.type}") from None
