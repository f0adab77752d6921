"""The ``normserve`` command: ``session ...``, ``health`` and ``bench`` operate a server; ``serve``
hands over to the server's own command. Nothing here imports ``normserve.server``, and the operator
commands import no torch (only ``session export -o``, ``session import`` and ``bench``, which handle
torch files or tensors, load it).

With ``--json``, every command prints exactly one JSON document on stdout, failures included
(``{"error": {"code": ..., "message": ..., "hint": ...}}``), and exits non-zero on failure: 1 when
the command failed, 2 when its arguments were wrong.

Every command that talks to a server takes ``--tls``, ``--ca-file``, ``--cert-file``, ``--key-file``
and ``--token-file`` (defaults from NORMSERVE_TLS, NORMSERVE_CA_FILE, NORMSERVE_CERT_FILE,
NORMSERVE_KEY_FILE, NORMSERVE_TOKEN_FILE; the token itself may be in NORMSERVE_TOKEN)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from normserve import __version__
from normserve.client._common import (
    DEFAULT_TARGET,
    RenormLimits,
    SessionInfo,
    check_token,
    tensor_values,
)
from normserve.client._errors import NormserveError
from normserve.client._sync import Client
from normserve.v1 import normserve_pb2 as pb

__all__ = ["main"]


#: What ``normserve serve ARGS`` runs instead of itself: the server's entry point, same interpreter.
SERVER_COMMAND = ("-m", "normserve.server")


def _serve(args: Sequence[str]) -> NoReturn:
    """Replaces this process with ``python -m normserve.server ARGS``: same pid, so signals reach
    the server itself and its exit status is the command's; its flags and ``--help`` are its own."""
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, "NORMSERVE_PROG": "normserve serve"}
    os.execve(sys.executable, [sys.executable, *SERVER_COMMAND, *args], env)


def target_address(text: str) -> str:
    """argparse type of --target: ``host:port`` with a port in 1-65535 (gRPC would take a missing
    port for 443 and wrap a larger one around), or a gRPC target URI (``dns:...``, ``unix:...``)."""
    if text.startswith(("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected host:port (e.g. 127.0.0.1:50051), got {text!r}")
    if not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, got {port}")
    return text


def positive_seconds(text: str) -> float:
    """argparse type of --timeout: seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    """TLS, client certificate and token options, each defaulting to a NORMSERVE_* variable. The
    token itself comes from a file or the environment, never from a flag: flags show in ``ps``."""
    env = os.environ.get
    p.add_argument(
        "--tls",
        action="store_const",
        const="1",
        default=env("NORMSERVE_TLS", ""),
        help="use TLS, trusting the system's root certificates unless --ca-file "
        "(env NORMSERVE_TLS=1)",
    )
    p.add_argument(
        "--no-tls",
        dest="tls",
        action="store_const",
        const="0",
        help="no TLS, whatever NORMSERVE_TLS says (--ca-file and --cert-file still imply TLS)",
    )
    p.add_argument(
        "--ca-file",
        default=env("NORMSERVE_CA_FILE") or None,
        metavar="PEM",
        help="CA certificates that sign the server's certificate; implies --tls "
        "(env NORMSERVE_CA_FILE)",
    )
    p.add_argument(
        "--cert-file",
        default=env("NORMSERVE_CERT_FILE") or None,
        metavar="PEM",
        help="client certificate, for a server that requires one (mutual TLS); implies --tls "
        "(env NORMSERVE_CERT_FILE)",
    )
    p.add_argument(
        "--key-file",
        default=env("NORMSERVE_KEY_FILE") or None,
        metavar="PEM",
        help="the client certificate's private key (env NORMSERVE_KEY_FILE)",
    )
    p.add_argument(
        "--token-file",
        default=env("NORMSERVE_TOKEN_FILE") or None,
        metavar="FILE",
        help="file holding the bearer token sent with every call (env NORMSERVE_TOKEN_FILE; or "
        "the token itself in env NORMSERVE_TOKEN)",
    )


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def connection_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``Client``/``AsyncClient`` security arguments of ``add_connection_arguments``' flags.
    Raises ``ValueError`` (never quoting a token) when one cannot work."""
    tls = str(args.tls).strip().lower()
    if tls not in _TRUE + _FALSE:
        raise ValueError(
            f"NORMSERVE_TLS={args.tls!r}: expected 1 or 0 (true/false, yes/no, on/off)"
        )
    token: str | None = None
    source = ""
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8", errors="replace") as f:
                token = f.read()
        except OSError as err:
            raise ValueError(
                f"cannot read the token file {args.token_file}: {err.strerror or err}"
            ) from None
        source = f"the token file {args.token_file}"
    elif os.environ.get("NORMSERVE_TOKEN"):
        token, source = os.environ["NORMSERVE_TOKEN"], "NORMSERVE_TOKEN"
    if token is not None:
        try:
            token = check_token(token)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None
    return {
        "tls": tls in _TRUE,
        "ca_file": args.ca_file,
        "cert_file": args.cert_file,
        "key_file": args.key_file,
        "token": token,
    }


def _client(args: argparse.Namespace) -> Client:
    # an operator's command answers at once; a script that wants retries uses the Client
    return Client(args.target, timeout=args.timeout, retry=0, **connection_kwargs(args))


def _emit(document: Any) -> None:
    """The one JSON document of a ``--json`` command."""
    print(json.dumps(document, indent=2))


def _print_session(info: SessionInfo, as_json: bool) -> None:
    if as_json:
        _emit(info.to_dict())
        return
    values = info.to_dict()
    momentum = "cumulative" if info.momentum is None else f"{info.momentum:g}"
    eps = "unset (the input dtype's machine epsilon)" if info.eps is None else f"{info.eps:g}"
    print(f"session      {info.session_id}")
    print(f"kind         {info.kind}")
    if info.normalized_shape:
        print(f"normalized   {list(info.normalized_shape)}")
    if info.num_groups:
        print(f"groups       {info.num_groups}")
    if info.renorm is not None:
        r = info.renorm
        print(
            f"renorm       rmax {r.rmax:g} (warm-up {r.rmax_warmup_steps}), "
            f"dmax {r.dmax:g} (warm-up {r.dmax_warmup_steps})"
        )
    if info.ghost_batch_size:
        print(f"ghost batch  {info.ghost_batch_size}")
    if info.time_steps:
        print(f"time steps   {info.time_steps}")
    print(f"features     {info.num_features}")
    print(f"eps          {eps}")
    print(f"momentum     {momentum}")
    print(f"affine       {str(info.affine).lower()}")
    print(f"track stats  {str(info.track_running_stats).lower()}")
    print(f"device       {info.device}")
    print(f"version      {info.version}")
    print(f"batches      {info.num_batches_tracked}")
    if info.frozen:
        print("frozen       true (every change of state is refused)")
    if info.calibration_start is not None:
        print(
            f"calibrating  since {info.calibration_start.isoformat(timespec='seconds')}: "
            f"{info.calibration_batches} batches, {info.calibration_samples} samples"
        )
    if info.adapted_batches is not None:
        print(f"adapted      {info.adapted_batches} batches")
    print(f"created      {info.create_time.isoformat(timespec='seconds')}")
    print(f"updated      {info.update_time.isoformat(timespec='seconds')}")
    if info.expire_time is not None:
        print(
            f"expires      {info.expire_time.isoformat(timespec='seconds')} "
            f"(after {info.ttl_seconds:g} s unused)"
        )
    for name in ("running_mean", "running_var", "weight", "bias", "adapted_mean", "adapted_var"):
        value = values[name]
        if value is not None and value and isinstance(value[0], list):  # recurrent: [T, C]
            value = [v for row in value for v in row]
        if value is not None:
            shown = ", ".join(f"{v:.6g}" for v in value[:8])
            more = f", ... ({len(value)} values)" if len(value) > 8 else ""
            print(f"{name:<12} [{shown}{more}]")


def _renorm_limits(args: argparse.Namespace) -> RenormLimits | None:
    """Batch renorm's limits from the flags given (the others at their defaults), or None."""
    given = {
        name: getattr(args, name)
        for name in ("rmax", "dmax", "rmax_warmup_steps", "dmax_warmup_steps")
        if getattr(args, name) is not None
    }
    return RenormLimits(**given) if given else None


def _create(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.create_session(
            args.num_features,
            session_id=args.id,
            eps=args.eps,
            momentum=None if args.cumulative else args.momentum,
            # unset: torch's default for the kind
            affine=False if args.no_affine else None,
            track_running_stats=(
                True if args.track_running_stats else False if args.no_track_running_stats else None
            ),
            device=args.device,
            allow_non_finite=args.allow_non_finite,
            ttl_seconds=args.ttl,
            kind=args.kind,
            normalized_shape=args.normalized_shape,
            num_groups=args.num_groups,
            has_bias=False if args.no_bias else None,
            renorm=_renorm_limits(args),
            ghost_batch_size=args.ghost_batch_size,
            time_steps=args.time_steps,
        )
    if args.json:
        _print_session(info, True)
    else:
        print(info.session_id)
    return 0


def _list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        sessions = client.list_sessions()
    if args.json:
        _emit([s.to_dict() for s in sessions])
        return 0
    print(f"{'SESSION':<34} {'FEATURES':>8} {'DEVICE':<8} {'VERSION':>8} {'BATCHES':>8}")
    for s in sessions:
        print(
            f"{s.session_id:<34} {s.num_features:>8} {s.device:<8} {s.version:>8} "
            f"{s.num_batches_tracked:>8}"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_session(client.get_session(args.session_id), args.json)
    return 0


def _delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete_session(args.session_id)
    if args.json:
        _emit({"deleted": args.session_id})
    else:
        print(f"deleted {args.session_id}")
    return 0


def _reset(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_session(client.reset_session(args.session_id), args.json)
    return 0


def _changing(change: str) -> Callable[[argparse.Namespace], int]:
    """A command that makes one of the session's changes without arguments (``freeze``,
    ``start_calibration``, ...) and shows the session after it."""

    def command(args: argparse.Namespace) -> int:
        with _client(args) as client:
            _print_session(getattr(client, change)(args.session_id), args.json)
        return 0

    return command


def _export(args: argparse.Namespace) -> int:
    if not args.output:  # JSON of the values: no torch needed
        with _client(args) as client:
            req = pb.ExportStateRequest(session_id=args.session_id)
            msg = client._call(client._stub.ExportState, req, client.timeout)
        _emit({e.name: tensor_values(e.tensor) for e in msg.entries})
        return 0
    import torch

    with _client(args) as client:
        state = client.export_state(args.session_id)
    torch.save(state, args.output)
    if args.json:
        _emit({"session_id": args.session_id, "file": args.output, "keys": list(state)})
    else:
        print(f"wrote {', '.join(state)} to {args.output} (torch.load + load_state_dict)")
    return 0


def _import(args: argparse.Namespace) -> int:
    import torch

    try:
        state = torch.load(args.file, map_location="cpu", weights_only=True)
    except OSError as err:  # no such file, a folder, no permission
        raise ValueError(f"{args.file}: cannot read it ({err.strerror or err})") from None
    except Exception:  # torch raises several kinds, with advice that does not apply here
        raise ValueError(
            f"{args.file}: not a torch state_dict file (expected what torch.save(module."
            "state_dict()) or `normserve session export -o` writes: names mapped to tensors)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{args.file}: expected a state_dict (a mapping of names to tensors)")
    with _client(args) as client:
        info = client.import_state(args.session_id, state, strict=not args.no_strict)
    if args.json:
        _emit({"imported": list(state), "session": info.to_dict()})
    else:
        print(f"imported {', '.join(state)} into {info.session_id} (version {info.version})")
    return 0


def _health(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.health(args.service)
    if args.json:
        _emit({"target": args.target, "service": args.service, "status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="normserve", description="Normalization as a service.")
    p.add_argument("--version", action="version", version=f"normserve {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # Listed here, run by main() before parsing: every argument goes to the server's command.
    sub.add_parser(
        "serve",
        add_help=False,
        help="run a server until SIGTERM/SIGINT (normserve serve --help: its flags)",
    )

    remote = _Parser(add_help=False)
    remote.add_argument(
        "--target",
        type=target_address,
        default=os.environ.get("NORMSERVE_TARGET", DEFAULT_TARGET),
        help=f"server host:port (env NORMSERVE_TARGET; default {DEFAULT_TARGET})",
    )
    remote.add_argument("--timeout", type=positive_seconds, default=10.0, help="seconds per call")
    remote.add_argument("--json", action="store_true", help="machine-readable output")
    add_connection_arguments(remote)

    health = sub.add_parser("health", parents=[remote], help="ask the gRPC health service")
    health.add_argument("--service", default="", help="service name ('' for the server)")
    health.set_defaults(func=_health)

    session = sub.add_parser("session", help="manage sessions")
    ssub = session.add_subparsers(dest="session_command", required=True, metavar="ACTION")

    create = ssub.add_parser("create", parents=[remote], help="create a session")
    create.add_argument(
        "num_features",
        type=int,
        help="channels (dim 1 of every input); layer and RMS norm: 0, or the product of "
        "--normalized-shape",
    )
    create.add_argument("--id", default="", help="session id (default: the server picks one)")
    create.add_argument(
        "--kind",
        default="batch_norm",
        choices=[
            "batch_norm",
            "layer_norm",
            "group_norm",
            "instance_norm",
            "rms_norm",
            "batch_renorm",
            "ghost_batch_norm",
            "recurrent_batch_norm",
        ],
        help="the normalization (default: batch_norm)",
    )
    create.add_argument(
        "--normalized-shape",
        type=int,
        nargs="+",
        default=None,
        metavar="DIM",
        help="layer and RMS norm: the trailing dims normalized together",
    )
    create.add_argument("--num-groups", type=int, default=0, help="group norm: groups of channels")
    create.add_argument("--no-bias", action="store_true", help="layer norm: a weight only")
    create.add_argument("--rmax", type=float, default=None, help="batch renorm: r's limit (3)")
    create.add_argument("--dmax", type=float, default=None, help="batch renorm: d's limit (5)")
    create.add_argument(
        "--rmax-warmup-steps",
        type=int,
        default=None,
        help="batch renorm: TRAIN batches over which rmax ramps up from 1 (0)",
    )
    create.add_argument(
        "--dmax-warmup-steps",
        type=int,
        default=None,
        help="batch renorm: TRAIN batches over which dmax ramps up from 0 (0)",
    )
    create.add_argument(
        "--ghost-batch-size", type=int, default=0, help="ghost batch norm: virtual batch size"
    )
    create.add_argument(
        "--time-steps", type=int, default=0, help="recurrent batch norm: time-step slots"
    )
    create.add_argument(
        "--eps",
        type=float,
        default=None,
        help="default 1e-5 (RMS norm: the input dtype's machine epsilon)",
    )
    momentum = create.add_mutually_exclusive_group()
    momentum.add_argument("--momentum", type=float, default=0.1, help="EMA factor (default 0.1)")
    momentum.add_argument(
        "--cumulative", action="store_true", help="cumulative average (torch's momentum=None)"
    )
    create.add_argument("--no-affine", action="store_true")
    track = create.add_mutually_exclusive_group()
    track.add_argument(
        "--track-running-stats",
        action="store_true",
        help="instance norm: keep running statistics (batch norm keeps them by default)",
    )
    track.add_argument("--no-track-running-stats", action="store_true")
    create.add_argument("--device", default="", help="auto, cpu, cuda or cuda:N")
    create.add_argument("--allow-non-finite", action="store_true", help="accept NaN/Inf inputs")
    create.add_argument(
        "--ttl",
        type=float,
        default=None,
        metavar="SECONDS",
        help="expire after this many seconds unused (0: never; default: the server's)",
    )
    create.set_defaults(func=_create)

    ls = ssub.add_parser("list", parents=[remote], help="list sessions")
    ls.set_defaults(func=_list)

    actions: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("show", "config, statistics and version of a session", _show),
        ("delete", "delete a session", _delete),
        ("reset", "reset running statistics to mean 0, var 1", _reset),
        ("freeze", "refuse every change of state until unfrozen", _changing("freeze")),
        ("unfreeze", "accept changes of state again", _changing("unfreeze")),
        (
            "calibrate-start",
            "begin a recalibration (precise batch norm); MODE_CALIBRATE batches follow",
            _changing("start_calibration"),
        ),
        (
            "calibrate-commit",
            "install the calibrated population statistics",
            _changing("commit_calibration"),
        ),
        ("calibrate-abort", "discard the recalibration", _changing("abort_calibration")),
        (
            "adaptation-promote",
            "replace the running statistics with the adapted ones",
            _changing("promote_adaptation"),
        ),
        ("adaptation-reset", "discard the adapted statistics", _changing("reset_adaptation")),
    ]
    for name, help_, func in actions:
        action = ssub.add_parser(name, parents=[remote], help=help_)
        action.add_argument("session_id")
        action.set_defaults(func=func)

    export = ssub.add_parser("export", parents=[remote], help="export the state_dict")
    export.add_argument("session_id")
    export.add_argument("-o", "--output", help="write a torch file here (default: JSON to stdout)")
    export.set_defaults(func=_export)

    imp = ssub.add_parser("import", parents=[remote], help="import a state_dict torch file")
    imp.add_argument("session_id")
    imp.add_argument("file")
    imp.add_argument("--no-strict", action="store_true", help="allow missing keys")
    imp.set_defaults(func=_import)

    from normserve.client._bench_cli import add_parser as add_bench_parser  # loads no matplotlib

    add_bench_parser(sub)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse, whose usage errors become one JSON document when the command line asks for JSON."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            _emit({"error": {"code": "USAGE", "message": f"{self.prog}: {message}", "hint": ""}})
            sys.exit(2)
        super().error(message)


def _fail(err: BaseException, as_json: bool) -> int:
    """Reports a failed command: one line (and a hint line) on stderr, or one JSON document."""
    code = getattr(err, "code", None)
    code = getattr(code, "name", code)  # a grpc.StatusCode, or already a name
    message, hint = str(err), getattr(err, "hint", "")
    if isinstance(err, NormserveError):
        message = err.message
    if as_json:
        _emit({"error": {"code": code, "message": message, "hint": hint}})
    else:
        print(f"normserve: {code + ': ' if code else ''}{message}", file=sys.stderr)
        if hint:
            print(f"normserve: hint: {hint}", file=sys.stderr)
    return 1


def _wants_json(argv: Sequence[str]) -> bool:
    """Whether the command prints a JSON document on stdout: ``--json`` (for ``bench``, whose
    ``--json FILE`` writes a file, only ``--json`` alone or ``--json -``)."""
    if argv[:1] != ["bench"]:
        return "--json" in argv
    for i, arg in enumerate(argv):
        if arg == "--json=-":
            return True
        if arg == "--json":
            after = argv[i + 1] if i + 1 < len(argv) else None
            return after is None or after == "-" or after.startswith("--")
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command; ``serve`` does not return (the process becomes the server)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        try:
            _serve(argv[1:])
        except OSError as err:
            print(f"normserve: cannot run the server ({sys.executable}): {err}", file=sys.stderr)
            return 1
    as_json = _wants_json(argv)
    if as_json and argv[:1] == ["--version"]:
        _emit({"version": __version__})
        return 0
    _Parser.json_errors = as_json
    args: Any = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # e.g. `normserve session list | head`
        sys.stderr.close()
        return 0
    except (NormserveError, OSError, ValueError, TypeError) as err:
        return _fail(err, as_json)
    except Exception as err:
        from normserve.client._bench import EarlyFailure

        if not isinstance(err, EarlyFailure):
            raise
        return _fail(err, as_json)
