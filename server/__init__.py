"""The normserve server: ``serve(Settings())`` runs it; ``start_server`` embeds one (tests, apps)."""

from __future__ import annotations

from normserve.server._app import Server, serve, start_server
from normserve.server._settings import Settings

__all__ = ["Server", "Settings", "serve", "start_server"]
