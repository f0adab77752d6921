"""The server's own command (``normserve-server``, ``python -m normserve.server``): flags to
``Settings``, then ``serve()``. ``normserve serve`` replaces its process with this one."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from normserve import __version__

# the package's public names, not its modules: the entry point survives their refactoring
from normserve.server import Settings, serve

__all__ = ["main", "parser"]


def parser(prog: str = "normserve-server") -> argparse.ArgumentParser:
    """The server's flags, one per ``Settings`` field (each also read from ``NORMSERVE_<FIELD>``)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Run a normserve server until SIGTERM or SIGINT, then drain it and exit 0 "
        "(2 if it cannot start). The same command as `normserve serve` and "
        "`python -m normserve.server`.",
    )
    p.add_argument("--version", action="version", version=f"normserve {__version__}")
    Settings.add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None, prog: str = "normserve-server") -> int:
    """Parses ``argv`` (default: ``sys.argv[1:]``), runs the server, returns the exit status."""
    args = parser(prog).parse_args(argv)
    return serve(Settings.from_args(args))
