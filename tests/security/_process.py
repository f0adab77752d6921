"""A normserve server in a subprocess, as an operator runs it, so that its memory is its own.

``python -m normserve.server`` on a free loopback port (read back from its first log line), with
``serve()``'s process settings (malloc tuning, torch threads). ``rss()`` reads the server's
resident memory from /proc; ``alive()`` says whether it still runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from types import TracebackType

__all__ = ["ServerProcess", "rss_bytes"]


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (VmRSS), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServerProcess:
    """``with ServerProcess("--max-message-bytes", "1048576") as srv: srv.address``. The server's
    stderr is kept (its last lines) for failure messages."""

    def __init__(self, *flags: str, start_timeout: float = 60.0) -> None:
        self.flags = flags
        self.start_timeout = start_timeout
        self.address = ""
        self.log: deque[str] = deque(maxlen=200)
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> ServerProcess:
        cmd = [
            *(sys.executable, "-m", "normserve.server"),
            *("--address", "127.0.0.1:0", "--metrics-address", "off", "--device", "cpu"),
            *self.flags,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NORMSERVE_AUTH_TOKENS", None)
        self._proc = proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stderr is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if line:
                self.log.append(line.rstrip("\n"))
            match = re.search(r"listening on (\S+:\d+)", line)
            if match:
                self.address = match.group(1)
                break
            if not line and proc.poll() is not None:
                break
        if not self.address:
            self._kill()
            raise RuntimeError("the server did not start:\n" + "\n".join(self.log))
        # keep draining stderr, so the server never blocks on a full pipe
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self.log.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.log)[-lines:])

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._kill()
