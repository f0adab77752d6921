"""A real redis-server for tests: started on a free loopback port with AOF on, killed and restarted.

``with RedisServer(tmp_path) as redis: RedisStore(redis.url)``. The port is chosen once and kept
across restarts, so a store built on ``url`` reconnects to the same server after ``restart()``.
``kill()`` is SIGKILL (what AOF with ``appendfsync always`` must survive); ``stop()`` is a clean
shutdown. Without redis-server the test is skipped, except in CI (``CI=true``), where a missing
server is a broken CI image and fails the test.

The binary is ``$NORMSERVE_REDIS_SERVER`` if set (Debian's package unpacked with ``dpkg -x``
somewhere other than /usr), else ``redis-server`` on the PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import pytest

__all__ = ["RedisServer", "redis_server_binary"]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    """The redis-server to run; skips the test (fails it in CI) if there is none."""
    found = os.environ.get("NORMSERVE_REDIS_SERVER") or shutil.which("redis-server")
    if found and os.access(found, os.X_OK):
        return found
    why = (
        "redis-server is not installed (Debian package redis-server; or set NORMSERVE_REDIS_SERVER)"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why}: CI must have it", pytrace=False)
    pytest.skip(why)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    """True once the server answers PING with PONG (not while it loads its AOF: -LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process, its data (the AOF) and its log in ``directory``."""

    def __init__(self, directory: Path, port: int = 0, appendfsync: str = "always") -> None:
        self.directory = Path(directory)
        self.port = port
        self.appendfsync = appendfsync
        self.log_path = self.directory / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if not self.port:
            raise RuntimeError("RedisServer has no port before start()")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Starts the server and waits until it answers PING; raises RuntimeError with the
        server's log if it does not within 10 s."""
        if self.running:
            raise RuntimeError(f"redis-server is already running on port {self.port}")
        binary = redis_server_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        # The free port is picked once: a restart must come back where the clients look for it.
        # Another process may take it between our probe and redis's bind, so a first start retries
        # with a fresh port; a restart cannot.
        choose = not self.port
        for _attempt in range(5 if choose else 1):
            if choose:
                self.port = _free_port()
            if self._launch(binary):
                return
            if choose and "Address already in use" in self._log_tail():
                continue
            break
        raise RuntimeError(
            f"redis-server did not start on 127.0.0.1:{self.port} (it exited, or did not answer "
            f"PING within {_START_TIMEOUT:.0f} s); its log ({self.log_path}):\n{self._log_tail()}"
        )

    def _launch(self, binary: str) -> bool:
        cmd = [
            binary,
            *("--bind", "127.0.0.1", "--port", str(self.port)),
            *("--save", "", "--appendonly", "yes", "--appendfsync", self.appendfsync),
            *("--dir", str(self.directory), "--daemonize", "no", "--logfile", ""),
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if _ping(self.port):
                return True
            time.sleep(0.02)
        self.kill()
        return False

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """A clean shutdown (SIGTERM: redis flushes its AOF and exits), waited for."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, waited for: what is not in the AOF yet is lost."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def restart(self) -> None:
        """Stops the server if it runs and starts it again on the same port and data."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
