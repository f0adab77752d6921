"""``python -m normserve``: the same CLI as the ``normserve`` command."""

from normserve.client._cli import main

raise SystemExit(main())
