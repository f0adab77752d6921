"""``RemoteBatchNorm1d/2d/3d``: drop-in ``torch.nn.BatchNorm*d`` whose statistics live on a server.

``client`` is a ``Client`` or a target; with a target, ``tls``, ``ca_file``, ``cert_file``,
``key_file`` and ``token`` (or ``token_file``) secure the connection as ``Client``'s arguments of
the same names do.

The running statistics are a server session's; weight and bias are ordinary local parameters. The
server normalizes (x - mean) / sqrt(var + eps) and the affine transform runs locally under autograd.
Gradients with respect to the input are computed locally from the normalized output and the
statistics the server used, by batch norm's closed-form backward, so training matches torch.

How a module meets the session it names, and what copies of it hold (docs/modules.md says it for
users):
- constructed with a ``session_id`` that exists, it attaches to that session once its config
  matches (``if_exists="error"`` refuses instead); so workers share one, and a restarted job
  finds its own;
- ``copy.deepcopy`` forks: the copy gets a new session holding a copy of the statistics, as a deep
  copy of ``torch.nn.BatchNorm`` gets copies of its buffers (EMA and SWA copies stay apart);
- ``pickle`` and ``torch.save`` keep a reference: target, TLS file paths, session id and config,
  plus a copy of the statistics used only to re-create the session if it is gone. Never a token
  value. The unpickled module connects on first use, attaching to that session.
"""

from __future__ import annotations

import argparse
import copy
import os
import threading
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from normserve.client._common import DEFAULT_TARGET, KindName, SessionInfo
from normserve.client._errors import AlreadyExistsError, NotFoundError
from normserve.client._sync import Client

__all__ = ["RemoteBatchNorm1d", "RemoteBatchNorm2d", "RemoteBatchNorm3d"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")
IfExists = Literal["attach", "error"]

# Modules connect lazily after unpickling, possibly from several threads (nn.DataParallel replicas)
_CONNECTING = threading.RLock()


class _RemoteNormalize(torch.autograd.Function):
    """x -> x_hat through the server; backward is batch norm's, from x_hat and the statistics."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: _RemoteBatchNorm, mode: str) -> torch.Tensor:  # type: ignore[override]
        result = module.client.normalize(module.session_id, x, mode=mode)  # type: ignore[arg-type]
        x_hat = result.output
        invstd = torch.rsqrt(result.var.to(x.device) + module.eps)
        ctx.save_for_backward(x_hat, invstd)
        ctx.batch_statistics = result.batch_statistics
        return x_hat

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        x_hat, invstd = ctx.saved_tensors
        dtype = grad.dtype
        g, xh = grad.float(), x_hat.float()
        shape = [1, -1] + [1] * (g.dim() - 2)
        inv = invstd.view(shape)
        if ctx.batch_statistics:
            dims = [0, *range(2, g.dim())]
            mean_g = g.mean(dim=dims, keepdim=True)
            mean_gx = (g * xh).mean(dim=dims, keepdim=True)
            dx = inv * (g - mean_g - xh * mean_gx)
        else:
            dx = g * inv
        return dx.to(dtype), None, None


def _env_connection(**given: Any) -> dict[str, Any]:
    """``Client`` security arguments as the CLI builds them: ``given`` wins, NORMSERVE_TLS,
    NORMSERVE_CA_FILE, NORMSERVE_CERT_FILE, NORMSERVE_KEY_FILE, NORMSERVE_TOKEN_FILE and
    NORMSERVE_TOKEN fill the rest."""
    from normserve.client._cli import connection_kwargs  # the CLI's rules, not a copy of them

    env = os.environ.get
    args = {
        "tls": env("NORMSERVE_TLS", ""),
        "ca_file": env("NORMSERVE_CA_FILE") or None,
        "cert_file": env("NORMSERVE_CERT_FILE") or None,
        "key_file": env("NORMSERVE_KEY_FILE") or None,
        "token_file": env("NORMSERVE_TOKEN_FILE") or None,
    }
    args.update(given)
    return connection_kwargs(argparse.Namespace(**args))


def _given(client: Client) -> dict[str, Any]:
    """What a module given ``client`` keeps to reconnect: what ``Client`` shows of its options."""
    options = {"timeout": client.timeout, "chunk_bytes": client.chunk_bytes, "retry": client.retry}
    return {"given": True, "target": client.target, **options}


class _RemoteBatchNorm(nn.Module):
    _ranks: tuple[int, ...] = ()
    _name = ""
    #: the session kind; the batch-norm variants (renorm, ghost) add their fields through
    #: ``_kind_options``
    _kind: KindName = "batch_norm"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        client: Client | str = DEFAULT_TARGET,
        session_id: str = "",
        if_exists: IfExists = "attach",
        server_device: str = "",
        ttl_seconds: float | None = None,
        tls: bool = False,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        token: str | None = None,
        token_file: str | None = None,
    ) -> None:
        """torch's arguments, then where the statistics live: ``client`` (a ``Client``, or a
        target with ``tls``, ``ca_file``, ``cert_file``, ``key_file`` and ``token`` or
        ``token_file``), ``session_id`` (default: a new session, its id picked by the server),
        ``if_exists`` (a ``session_id`` that exists: "attach" to it once its config matches
        this module's, else ValueError naming each difference; "error": AlreadyExistsError),
        ``server_device`` and ``ttl_seconds`` (for a session this module creates)."""
        super().__init__()
        if if_exists not in ("attach", "error"):
            raise ValueError(f"if_exists must be 'attach' or 'error', got {if_exists!r}")
        given = tls or ca_file or cert_file or key_file or token is not None or token_file
        if isinstance(client, Client) and given:
            raise ValueError(
                "tls, ca_file, cert_file, key_file and token configure the connection to a "
                "target: give them to the Client you pass, or pass its target instead"
            )
        if token is not None and token_file:
            raise ValueError("give either token or token_file, not both")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.session_id = session_id
        self._server_device = server_device
        self._ttl_seconds = ttl_seconds
        self._owns_client = not isinstance(client, Client)  # closed by delete_session
        self._client: Client | None = None
        # What reconnecting takes (after unpickling): every option but the token's value.
        if isinstance(client, Client):
            self._client = client
            self._connection: dict[str, Any] = _given(client)
        else:
            self._connection = {"given": False, "target": client, "tls": tls, "ca_file": ca_file}
            self._connection |= {"cert_file": cert_file, "key_file": key_file}
            self._connection |= {"token_file": token_file, "had_token": token is not None}
        self._token = token  # in memory only: never pickled
        self._attached = False
        self._restore: dict[str, Any] | None = None  # see __getstate__
        if affine:
            kw = {"device": device, "dtype": dtype}
            self.weight = nn.Parameter(torch.ones(num_features, **kw))  # type: ignore[arg-type]
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))  # type: ignore[arg-type]
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self._attach(if_exists)

    # ---- the connection and the session

    @property
    def client(self) -> Client:
        """The ``Client`` this module calls through (opened on first use after unpickling)."""
        if self._client is None:
            with _CONNECTING:
                if self._client is None:
                    self._client = self._open_client()
        return self._client

    def _open_client(self) -> Client:
        conn = self._connection
        self._owns_client = True
        if conn["given"]:  # from a Client the user made: its security is not ours to read
            options = {k: conn[k] for k in ("timeout", "chunk_bytes", "retry")}
            return Client(conn["target"], **options, **_env_connection())
        token = self._token
        if token is None and (conn["token_file"] or conn["had_token"]):
            token_file = conn["token_file"] or os.environ.get("NORMSERVE_TOKEN_FILE") or None
            token = _env_connection(
                tls="0", ca_file=None, cert_file=None, key_file=None, token_file=token_file
            )["token"]
            if token is None:
                raise ValueError(
                    f"{self._describe()} was pickled without its token (a token's value is never "
                    "pickled): set NORMSERVE_TOKEN_FILE or NORMSERVE_TOKEN, or construct it with "
                    "token_file=..., or give it a Client with .connect(client)"
                )
        security = {k: conn[k] for k in ("tls", "ca_file", "cert_file", "key_file")}
        return Client(conn["target"], **security, token=token)

    def _describe(self) -> str:
        session = f"session {self.session_id!r}" if self.session_id else "a new session"
        return f"{type(self).__name__} ({session} on {self._connection['target']})"

    def _ensure_session(self) -> None:
        """Attaches on first use after unpickling (once)."""
        if not self._attached:
            with _CONNECTING:
                if not self._attached:
                    self._attach("attach")

    def _attach(self, if_exists: IfExists) -> None:
        """Creates the session, or attaches to the one under ``session_id``."""
        client = self.client
        info: SessionInfo | None = None
        if self.session_id and if_exists == "attach":
            # two workers starting at once: one creates, the other finds it; a session deleted
            # between the two calls is looked for again
            for _ in range(3):
                try:
                    info = client.get_session(self.session_id, tensors=False)
                    break
                except NotFoundError:
                    pass
                try:
                    info = self._create(client)
                    break
                except AlreadyExistsError:
                    pass
            if info is None:  # pragma: no cover - three losing races in a row
                info = client.get_session(self.session_id, tensors=False)
        else:
            info = self._create(client)
        self._check_config(info)
        self.session_id = info.session_id
        self._session_ttl = info.ttl_seconds
        self._attached = True
        self._restore = None

    def _create(self, client: Client) -> SessionInfo:
        info = client.create_session(
            self.num_features,
            session_id=self.session_id,
            eps=self.eps,
            momentum=self.momentum,
            affine=False,  # weight and bias stay local, trainable
            track_running_stats=self.track_running_stats,
            device=self._server_device,
            ttl_seconds=self._ttl_seconds,
            kind=self._kind,
            **self._kind_options(),
        )
        if self._restore:  # unpickled, and the session was gone: its statistics come back
            self._check_config(info)
            stats = {k: torch.as_tensor(v) for k, v in self._restore.items()}
            client.import_state(info.session_id, stats, strict=False)
        return info

    def _kind_options(self) -> dict[str, Any]:
        """create_session's arguments for the kind's own fields (as SessionInfo names them)."""
        return {}

    def _check_config(self, info: SessionInfo) -> None:
        wanted = {
            "kind": self._kind,
            "num_features": self.num_features,
            "eps": self.eps,
            "momentum": self.momentum,
            "affine": False,
            "track_running_stats": self.track_running_stats,
            **self._kind_options(),
        }
        diffs = [
            f"{name} is {getattr(info, name)!r} in the session, {value!r} in the module"
            for name, value in wanted.items()
            if getattr(info, name) != value
        ]
        if not diffs:
            return
        why = ""
        if info.affine:
            why = " (weight and bias are the module's own parameters: its sessions have none)"
        raise ValueError(
            f"{type(self).__name__} cannot attach to session {info.session_id!r} on "
            f"{self._connection['target']}, whose config differs: {'; '.join(diffs)}{why}. "
            "Use another session_id, delete that session, or build the module to match it"
        )

    def connect(self, client: Client) -> _RemoteBatchNorm:
        """Calls through ``client`` from now on (a module loaded with ``torch.load`` whose
        connection needs options the pickle could not keep), attaching to the session now.
        Returns the module."""
        if self._owns_client and self._client is not None:
            self._client.close()
        self._client, self._owns_client, self._token = client, False, None
        self._connection = _given(client)
        self._attach("attach")
        return self

    # ---- copies: deepcopy forks the session, pickling keeps a reference

    def __getstate__(self) -> dict[str, Any]:
        """A reference to the session (no channel, no token value), plus a copy of its
        statistics that re-creates it should it be gone when the module is used again."""
        state = self.__dict__.copy()
        if self._attached and self.track_running_stats:
            # numpy arrays: pickled by value (torch.multiprocessing would share these fleeting
            # tensors through file descriptors closed before a spawned child could open them)
            exported = self.client.export_state(self.session_id)
            state["_restore"] = {k: v.numpy() for k, v in exported.items()}
        state.update(_client=None, _owns_client=True, _token=None, _attached=False)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> _RemoteBatchNorm:
        """A new module with a new session, holding a copy of this one's statistics (EMA and
        SWA copies never move the statistics of the model they copy)."""
        self._ensure_session()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        keep = {"_client": self._client if not self._owns_client else None, "_token": self._token}
        for key, value in self.__dict__.items():
            if key not in keep:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__.update(keep)
        new._restore = None
        new.session_id = self._fork(self.client)
        new._attached = True
        return new

    def _fork(self, client: Client) -> str:
        info = client.create_session(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=False,
            track_running_stats=self.track_running_stats,
            device=self._server_device,
            ttl_seconds=self._session_ttl,
        )
        if self.track_running_stats:
            client.import_state(info.session_id, client.export_state(self.session_id))
        return info.session_id

    # ---- forward

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in self._ranks:
            ranks = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {ranks} input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        self._ensure_session()
        x_hat = _RemoteNormalize.apply(x, self, "train" if self.training else "eval")
        if self.weight is None:
            return x_hat
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = x_hat * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    # ---- the statistics live on the server

    def reset_running_stats(self) -> None:
        self._ensure_session()
        self.client.reset_session(self.session_id)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        self._ensure_session()
        for key, value in self.client.export_state(self.session_id).items():
            destination[prefix + key] = value

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        stats = {k: state_dict[prefix + k] for k in _STATS if prefix + k in state_dict}
        if self.track_running_stats:
            missing_keys += [prefix + k for k in _STATS if k not in stats]
            if stats:
                self._ensure_session()
                self.client.import_state(self.session_id, stats, strict=False)
        else:
            unexpected_keys += [prefix + k for k in stats]
        local = {k: v for k, v in state_dict.items() if k[len(prefix) :] not in _STATS}
        super()._load_from_state_dict(
            local, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def delete_session(self) -> None:
        """Deletes the server session (the module is unusable afterwards)."""
        self.client.delete_session(self.session_id)
        if self._owns_client:
            self.client.close()

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
            f"session={self.session_id!r}, target={self._connection['target']!r}"
        )


class RemoteBatchNorm1d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm1d`` over ``[N, C]`` or ``[N, C, L]``, statistics on a server."""

    _ranks = (2, 3)


class RemoteBatchNorm2d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm2d`` over ``[N, C, H, W]``, statistics on a server."""

    _ranks = (4,)


class RemoteBatchNorm3d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm3d`` over ``[N, C, D, H, W]``, statistics on a server."""

    _ranks = (5,)
