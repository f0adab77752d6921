"""Who is calling: bearer tokens mapped to tenants, and each tenant's request rate.

Wiring (``server/_app.py``), always, with or without tokens, since the default tenant's request
rate is a quota too::

    quotas = TenantQuotas(QuotaLimits(...from settings...), on_reject=metrics.record_quota_rejection)
    sessions = SessionManager(..., quotas=quotas)
    interceptors = [
        ObservabilityInterceptor(metrics),
        ErrorInterceptor(),
        AuthInterceptor.from_settings(settings, quotas),  # innermost: its refusals are logged
    ]

``AuthInterceptor.from_settings`` raises ``ValueError`` (naming the flag or variable and the line
number, never a token) when the tokens cannot be used, so build it before binding anything.

Tokens come from ``--auth-tokens-file`` or the environment variable ``NORMSERVE_AUTH_TOKENS``
(never a flag: flags show in ``ps``), one ``TENANT TOKEN`` per line (the variable may separate
lines with ';'), '#' comment lines and blank lines ignored. A tenant name is 1-64 characters of
[A-Za-z0-9._-] beginning with a letter or digit; a token is 16-4096 visible ASCII characters
(``openssl rand -hex 32`` makes one); a tenant may have several tokens (rotation: add the new one,
move the clients, remove the old one), a token names one tenant. The file is re-read when it
changes (replace it by renaming a new file over it); a version that cannot be used is logged
and the previous one stays.

A call must carry ``authorization: Bearer TOKEN``; without it the answer is UNAUTHENTICATED
"missing bearer token", with a token not in the table "invalid token", before the request is
decoded. Tokens are looked up by their HMAC under a key drawn at startup, so the lookup's timing
says nothing about any token, and never logged or counted. The gRPC health service answers
without a token (probes); reflection needs one like every other method. Without tokens every
caller is the default tenant.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import inspect
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from normserve.server._transport._context import _tenant, current_call
from normserve.server._transport._interceptors import WrappingInterceptor, wrap_handler
from normserve.server.service import DEFAULT_TENANT, TenantQuotas, Unauthenticated

__all__ = ["ENV_TOKENS", "AuthInterceptor", "TokenTable", "parse_tokens"]

log = logging.getLogger("normserve.server")

ENV_TOKENS = "NORMSERVE_AUTH_TOKENS"
#: Methods answered without a token: load balancers and orchestrators probe health unauthenticated.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN = re.compile(r"[\x21-\x7e]{16,4096}")
_MISSING = "missing bearer token"
_INVALID = "invalid token"


def parse_tokens(text: str, source: str, separators: str = "\n") -> dict[str, str]:
    """``TENANT TOKEN`` lines -> {token: tenant}. Raises ValueError naming ``source`` and the line
    number of the first unusable line; the message never holds a token (nor a tenant name: a
    line with its columns swapped would show its token there)."""
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    out: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.split(separators[0]), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{source}: line {number}"
        if len(parts) != 2:
            raise ValueError(f"{where}: expected 'TENANT TOKEN' (two fields)")
        tenant, token = parts
        if not TENANT.fullmatch(tenant):
            raise ValueError(
                f"{where}: the tenant must be 1-64 characters of [A-Za-z0-9._-], beginning with "
                "a letter or digit"
            )
        if not TOKEN.fullmatch(token):
            raise ValueError(
                f"{where}: the token must be 16-4096 visible ASCII characters (no spaces); "
                "'openssl rand -hex 32' makes one"
            )
        if token in out:
            raise ValueError(f"{where}: the same token as line {first_line[token]}")
        out[token] = tenant
        first_line[token] = number
    if not out:
        raise ValueError(f"{source}: no tokens (lines of 'TENANT TOKEN')")
    return out


@dataclass(frozen=True)
class _Table:
    key: bytes
    tenants: dict[bytes, str]  # HMAC(key, token) -> tenant


def _table(tokens: Mapping[str, str]) -> _Table:
    key = os.urandom(32)
    return _Table(key, {hmac.digest(key, t.encode(), hashlib.sha256): n for t, n in tokens.items()})


class TokenTable:
    """The tokens a server accepts, from a file (re-read when it changes) or the environment."""

    def __init__(self, tokens: Mapping[str, str], path: str = "") -> None:
        self._table = _table(tokens)
        self.path = path
        self._stamp = self._stat() if path else None

    @classmethod
    def load(cls, path: str = "", environ: Mapping[str, str] | None = None) -> TokenTable | None:
        """The table of ``path`` (the --auth-tokens-file) or of NORMSERVE_AUTH_TOKENS; None when
        neither is set. Raises ValueError when they cannot be used."""
        env = os.environ if environ is None else environ
        inline = env.get(ENV_TOKENS, "")
        if path and inline.strip():
            raise ValueError(f"--auth-tokens-file and {ENV_TOKENS}: set one, not both")
        if path:
            return cls(parse_tokens(_read(path), f"--auth-tokens-file {path}"), path)
        if inline.strip():
            return cls(parse_tokens(inline, ENV_TOKENS, "\n;"))
        return None

    @property
    def tenants(self) -> list[str]:
        """Every tenant of the table (for logs: never the tokens)."""
        return sorted(set(self._table.tenants.values()))

    def _stat(self) -> tuple[int, ...] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def _refresh(self) -> None:
        stamp = self._stat()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            tokens = parse_tokens(_read(self.path), f"--auth-tokens-file {self.path}")
        except (OSError, ValueError) as err:
            log.error("tokens not reloaded, the previous ones stay in use: %s", err)
            return
        self._table = _table(tokens)
        log.info("tokens reloaded from %s: %d tenant(s)", self.path, len(set(tokens.values())))

    def tenant(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """The tenant of the call's bearer token; raises Unauthenticated without a known one."""
        if self.path:
            self._refresh()
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(value, str) or value[:7].lower() != "bearer ":
            raise Unauthenticated(_MISSING)
        table = self._table
        given = value[7:].strip().encode("utf-8", "surrogateescape")
        tenant = table.tenants.get(hmac.digest(table.key, given, hashlib.sha256))
        if tenant is None:
            raise Unauthenticated(_INVALID)
        return tenant


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise ValueError(f"--auth-tokens-file {path}: not UTF-8 text") from None
    except OSError as err:
        raise OSError(f"--auth-tokens-file {path}: cannot read it ({err.strerror})") from None


Behavior = Callable[..., Any]


class AuthInterceptor(WrappingInterceptor):
    """Identifies each call's tenant (by token, or the default tenant without tokens) and takes
    one request from its rate quota, before the request is decoded; see the module docstring."""

    def __init__(self, tokens: TokenTable | None, quotas: TenantQuotas | None = None) -> None:
        super().__init__()
        self.tokens, self.quotas = tokens, quotas

    @classmethod
    def from_settings(
        cls,
        settings: Any,
        quotas: TenantQuotas | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> AuthInterceptor:
        """From ``Settings.auth_tokens_file`` (or NORMSERVE_AUTH_TOKENS in ``environ``)."""
        return cls(TokenTable.load(settings.auth_tokens_file, environ), quotas)

    def identify(self, context: grpc.aio.ServicerContext) -> str:
        """The call's tenant, after one request is taken from its rate; raises Unauthenticated
        or QuotaExceeded."""
        if self.tokens is None:
            tenant = DEFAULT_TENANT
        else:
            tenant = self.tokens.tenant(context.invocation_metadata())
        call = current_call()
        if call is not None:
            call.tenant = tenant
        if self.quotas is not None:
            self.quotas.admit(tenant)
        return tenant

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method.startswith(OPEN_PREFIXES):
            return handler
        identify = self.identify
        # A single request message is decoded only once its caller is known (grpc decodes it
        # before the behavior runs: the behavior gets the bytes and decodes them itself).
        deserialize = handler.request_deserializer
        deferred = not handler.request_streaming and deserialize is not None

        def unary(fn: Behavior) -> Behavior:
            async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
                token = _tenant.set(identify(context))
                try:
                    if deferred:
                        request = deserialize(request)
                    return await fn(request, context)
                finally:
                    _tenant.reset(token)

            return behavior

        def streaming(fn: Behavior) -> Behavior:
            if not inspect.isasyncgenfunction(fn):
                return unary(fn)

            async def behavior(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                token = _tenant.set(identify(context))
                try:
                    if deferred:
                        request = deserialize(request)
                    async for item in fn(request, context):
                        yield item
                finally:
                    # a generator abandoned by grpc is closed later, in another context
                    with contextlib.suppress(ValueError):
                        _tenant.reset(token)

            return behavior

        identity = (lambda raw: raw) if deferred else None
        return wrap_handler(handler, unary, streaming, request_deserializer=identity)
