"""``_RemoteNorm``, the base of every remote normalization module, and ``RemoteBatchNorm1d/2d/3d``:
drop-in ``torch.nn.BatchNorm*d`` whose statistics live on a server.

``client`` is a ``Client`` or a target; with a target, ``tls``, ``ca_file``, ``cert_file``,
``key_file`` and ``token`` (or ``token_file``) secure the connection as ``Client``'s arguments of
the same names do.

A module's normalization runs in a server session created without affine parameters: the server
returns x_hat ((x - mean) / sqrt(var + eps), or the kind's) and the statistics it used; weight and
bias are ordinary local parameters applied under autograd. Gradients with respect to the input are
computed locally from x_hat and those statistics by the kind's closed-form backward, so training
matches torch. Running statistics, where the kind keeps them, are the session's.

How a module meets the session it names, and what copies of it hold (the same for every kind;
docs/modules.md says it for users):
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
import dataclasses
import os
import threading
from collections.abc import Mapping
from typing import Any, Literal, TypedDict, Unpack

import torch
from torch import Tensor, nn

from normserve.client._common import DEFAULT_TARGET, KindName, SessionInfo
from normserve.client._errors import AlreadyExistsError, NotFoundError
from normserve.client._sync import Client

__all__ = ["RemoteBatchNorm1d", "RemoteBatchNorm2d", "RemoteBatchNorm3d", "RemoteNorm"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")
IfExists = Literal["attach", "error"]
# a config check names the fields that differ in this order: the kind, then SessionInfo's
_FIELD_ORDER = {
    n: i for i, n in enumerate(["kind", *(f.name for f in dataclasses.fields(SessionInfo))])
}

# Modules connect lazily after unpickling, possibly from several threads (nn.DataParallel replicas)
_CONNECTING = threading.RLock()


class RemoteOptions(TypedDict, total=False):
    """Where a module's session lives: the keyword arguments of ``_RemoteNorm.__init__``."""

    client: Client | str
    session_id: str
    if_exists: IfExists
    server_device: str
    ttl_seconds: float | None
    tls: bool
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    token: str | None
    token_file: str | None


class _RemoteNormalize(torch.autograd.Function):
    """x -> x_hat through the server; backward is the module's ``_backward``, from x_hat and the
    statistics the server used."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: _RemoteNorm, mode: str) -> torch.Tensor:  # type: ignore[override]
        options = module._normalize_options()
        result = module.client.normalize(module.session_id, x, mode=mode, **options)  # type: ignore[arg-type]
        invstd = torch.rsqrt(result.var.to(x.device) + module._eps_for(x.dtype))
        ctx.save_for_backward(x if module._backward_needs_input else None, result.output, invstd)
        ctx.module, ctx.batch_statistics = module, result.batch_statistics
        return result.output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        x, x_hat, invstd = ctx.saved_tensors
        g, xh, inv = grad.float(), x_hat.float(), invstd.float()
        dx = ctx.module._backward(g, x, xh, inv, ctx.batch_statistics)
        return dx.to(grad.dtype), None, None


def _channels(y: torch.Tensor) -> list[int]:
    """The view that broadcasts a per-channel [C] tensor over [N, C, *]."""
    return [1, -1] + [1] * (y.dim() - 2)


def _batch_backward(g: torch.Tensor, xh: torch.Tensor, invstd: torch.Tensor) -> torch.Tensor:
    """Batch norm's input gradient through x_hat = (x - mean) * invstd, per channel."""
    dims = [0, *range(2, g.dim())]
    mean_g = g.mean(dim=dims, keepdim=True)
    mean_gx = (g * xh).mean(dim=dims, keepdim=True)
    return invstd.view(_channels(g)) * (g - mean_g - xh * mean_gx)


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


class _RemoteNorm(nn.Module):
    """A torch module whose normalization is a server session's (of kind ``_kind``).

    Subclasses set their config attributes, call ``__init__`` (which creates or attaches to the
    session), then make their parameters (``_init_params``); they say which attributes are the
    session's config (``_config_fields``, or ``_session_config``), which inputs they take
    (``_check_input``) and the kind's backward (``_backward``). The session's lifecycle, copies,
    pickling, ``state_dict`` and ``extra_repr`` are the same for every kind, and all here."""

    _kind: KindName = "batch_norm"
    eps: float | None
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    #: whether the backward needs the input itself (saved for it only then)
    _backward_needs_input = False
    #: the attributes that are the session's config, as create_session and SessionInfo name them
    _config_fields: tuple[str, ...] = ()
    #: extra_repr's: attributes shown by value, then by name
    _repr_args: tuple[str, ...] = ()
    _repr_kwargs: tuple[str, ...] = ()

    def __init__(
        self,
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
        """Where the session lives: ``client`` (a ``Client``, or a target with ``tls``,
        ``ca_file``, ``cert_file``, ``key_file`` and ``token`` or ``token_file``), ``session_id``
        (default: a new session, its id picked by the server), ``if_exists`` (a ``session_id``
        that exists: "attach" to it once its config matches this module's, else ValueError
        naming each difference; "error": AlreadyExistsError), ``server_device`` and
        ``ttl_seconds`` (for a session this module creates)."""
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
        self._attach(if_exists)

    def _init_params(
        self, shape: Any, weight: bool, bias: bool, device: Any, dtype: torch.dtype | None
    ) -> None:
        """``weight`` (ones) and ``bias`` (zeros) of ``shape``, each a parameter or None."""
        kw: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_parameter("weight", nn.Parameter(torch.ones(shape, **kw)) if weight else None)
        self.register_parameter("bias", nn.Parameter(torch.zeros(shape, **kw)) if bias else None)

    # ---- what subclasses say

    def _session_config(self) -> dict[str, Any]:
        """The session's config (but kind and affine) as ``create_session`` takes it and
        ``SessionInfo`` reports it: what is created, and compared before attaching."""
        return {name: getattr(self, name) for name in self._config_fields}

    @property
    def _tracks(self) -> bool:
        """Whether the session keeps running statistics: they go into ``state_dict``, pickles
        and forks."""
        return bool(getattr(self, "track_running_stats", False))

    def _check_input(self, x: torch.Tensor) -> bool:
        """Raises for an input of the wrong rank; True for an unbatched one (a batch dim is
        added for the server, and taken off the output)."""
        return False

    def _normalize_options(self) -> dict[str, Any]:
        """``Client.normalize``'s arguments beside the batch and the mode."""
        return {}

    def _eps_for(self, dtype: torch.dtype) -> float:
        assert self.eps is not None  # only RMS norm's may be None (it says what it means)
        return self.eps

    def _backward(
        self, g: Tensor, x: Tensor | None, xh: Tensor, invstd: Tensor, batch_statistics: bool
    ) -> Tensor:
        """The input's gradient from the output's ``g``, x_hat and 1 / sqrt(var + eps) of the
        statistics the server used (``x`` only where ``_backward_needs_input``)."""
        raise NotImplementedError

    def _param_view(self, p: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``p`` shaped to broadcast over the output: per channel here."""
        return p.view(_channels(y))

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

    def _new_session(self, client: Client, session_id: str, ttl: float | None) -> SessionInfo:
        return client.create_session(
            session_id=session_id,
            kind=self._kind,
            affine=False,  # weight and bias stay local, trainable
            device=self._server_device,
            ttl_seconds=ttl,
            **self._session_config(),
        )

    def _create(self, client: Client) -> SessionInfo:
        info = self._new_session(client, self.session_id, self._ttl_seconds)
        if self._restore:  # unpickled, and the session was gone: its statistics come back
            self._check_config(info)
            stats = {k: torch.as_tensor(v) for k, v in self._restore.items()}
            client.import_state(info.session_id, stats, strict=False)
        return info

    def _check_config(self, info: SessionInfo) -> None:
        wanted = {"kind": self._kind, "affine": False, **self._session_config()}
        diffs = [
            f"{name} is {getattr(info, name)!r} in the session, {wanted[name]!r} in the module"
            for name in sorted(wanted, key=_FIELD_ORDER.__getitem__)
            if getattr(info, name) != wanted[name]
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

    def connect(self, client: Client) -> _RemoteNorm:
        """Calls through ``client`` from now on (a module loaded with ``torch.load`` whose
        connection needs options the pickle could not keep), attaching to the session now.
        Returns the module."""
        if self._owns_client and self._client is not None:
            self._client.close()
        self._client, self._owns_client, self._token = client, False, None
        self._connection = _given(client)
        self._attach("attach")
        return self

    def delete_session(self) -> None:
        """Deletes the server session (the module is unusable afterwards)."""
        self.client.delete_session(self.session_id)
        if self._owns_client:
            self.client.close()

    # ---- copies: deepcopy forks the session, pickling keeps a reference

    def __getstate__(self) -> dict[str, Any]:
        """A reference to the session (no channel, no token value), plus a copy of its
        statistics that re-creates it should it be gone when the module is used again."""
        state = self.__dict__.copy()
        if self._attached and self._tracks:
            # numpy arrays: pickled by value (torch.multiprocessing would share these fleeting
            # tensors through file descriptors closed before a spawned child could open them)
            exported = self.client.export_state(self.session_id)
            state["_restore"] = {k: v.numpy() for k, v in exported.items()}
        state.update(_client=None, _owns_client=True, _token=None, _attached=False)
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> _RemoteNorm:
        """A new module with a new session of the same config, holding a copy of this one's
        statistics (EMA and SWA copies never move the statistics of the model they copy)."""
        self._ensure_session()
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        keep = {"_client": self._client if not self._owns_client else None, "_token": self._token}
        for key, value in self.__dict__.items():
            if key not in keep:
                new.__dict__[key] = copy.deepcopy(value, memo)
        new.__dict__.update(keep)
        new._restore = None
        client = self.client
        new.session_id = self._new_session(client, "", self._session_ttl).session_id
        if self._tracks:
            client.import_state(new.session_id, client.export_state(self.session_id))
        new._attached = True
        return new

    # ---- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = self._check_input(x)
        if unbatched:  # the server's inputs have a batch dim
            x = x.unsqueeze(0)
        self._ensure_session()
        y = self._normalize(x)
        if self.weight is not None:
            y = y * self._param_view(self.weight, y)
        if self.bias is not None:
            y = y + self._param_view(self.bias, y)
        y = y.to(x.dtype)
        return y.squeeze(0) if unbatched else y

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """x_hat, through the server."""
        x_hat: torch.Tensor = _RemoteNormalize.apply(x, self, "train" if self.training else "eval")
        return x_hat

    # ---- the running statistics live on the server

    def reset_running_stats(self) -> None:
        if self._tracks:
            self._ensure_session()
            self.client.reset_session(self.session_id)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._tracks:
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
        if self._tracks:
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

    def extra_repr(self) -> str:
        args = [str(getattr(self, name)) for name in self._repr_args]
        args += [f"{name}={getattr(self, name)}" for name in self._repr_kwargs]
        where = f"session={self.session_id!r}, target={self._connection['target']!r}"
        return ", ".join([*args, where])


class _NormBase(_RemoteNorm):
    """Batch and instance norm (torch's ``_NormBase``): per-channel weight and bias, and running
    statistics where ``track_running_stats``."""

    eps: float
    _config_fields = ("num_features", "eps", "momentum", "track_running_stats")
    _repr_args = ("num_features",)
    _repr_kwargs = ("eps", "momentum", "affine", "track_running_stats")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        **remote: Unpack[RemoteOptions],
    ) -> None:
        """torch's arguments, then where the statistics live: ``client``, ``session_id``,
        ``if_exists``, ... (``RemoteOptions``, as ``_RemoteNorm.__init__`` says)."""
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        super().__init__(**remote)
        self._init_params(num_features, affine, affine, device, dtype)


class _RemoteBatchNorm(_NormBase):
    _ranks: tuple[int, ...] = ()
    #: the session kind; the batch-norm variants (renorm, ghost) add their fields through
    #: ``_kind_options``
    _kind: KindName = "batch_norm"

    def _session_config(self) -> dict[str, Any]:
        return {**super()._session_config(), **self._kind_options()}

    def _kind_options(self) -> dict[str, Any]:
        """create_session's arguments for the kind's own fields (as SessionInfo names them)."""
        return {}

    def _check_input(self, x: torch.Tensor) -> bool:
        if x.dim() not in self._ranks:
            ranks = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"expected {ranks} input (got {x.dim()}D input)")
        return False

    def _backward(
        self, g: Tensor, x: Tensor | None, xh: Tensor, invstd: Tensor, batch_statistics: bool
    ) -> Tensor:
        if not batch_statistics:  # the running statistics: constants
            return g * invstd.view(_channels(g))
        return self._train_backward(g, x, xh, invstd)

    def _train_backward(
        self, g: torch.Tensor, x: torch.Tensor | None, xh: torch.Tensor, invstd: torch.Tensor
    ) -> torch.Tensor:
        """The gradient through the batch's own statistics (the variants' differ)."""
        return _batch_backward(g, xh, invstd)


class RemoteBatchNorm1d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm1d`` over ``[N, C]`` or ``[N, C, L]``, statistics on a server."""

    _ranks = (2, 3)


class RemoteBatchNorm2d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm2d`` over ``[N, C, H, W]``, statistics on a server."""

    _ranks = (4,)


class RemoteBatchNorm3d(_RemoteBatchNorm):
    """``torch.nn.BatchNorm3d`` over ``[N, C, D, H, W]``, statistics on a server."""

    _ranks = (5,)


#: The base class of every remote normalization module, public for ``isinstance`` checks (e.g.
#: ``[m for m in model.modules() if isinstance(m, RemoteNorm)]`` to connect or recalibrate them).
RemoteNorm = _RemoteNorm
