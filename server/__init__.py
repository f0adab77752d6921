"""The normserve server: ``serve(Settings())`` runs it; ``start_server`` embeds one (tests, apps)."""

from __future__ import annotations

from normserve.server._app import Server, channel_options, configure_process, serve, start_server
from normserve.server._settings import Settings

__all__ = [
    "Server",
    "Settings",
    "channel_options",
    "configure_process",
    "serve",
    "start_server",
]
