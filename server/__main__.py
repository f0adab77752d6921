"""``python -m normserve.server``: the ``normserve-server`` command (what ``normserve serve`` runs)."""

import os

from normserve.server._cli import main

# `normserve serve` runs this module and names itself, so that the help shows what the user typed
raise SystemExit(main(prog=os.environ.get("NORMSERVE_PROG", "python -m normserve.server")))
