"""``python -m normserve.server``: the ``normserve-server`` command (what ``normserve serve`` runs)."""

from normserve.server._cli import main

raise SystemExit(main(prog="python -m normserve.server"))
