"""A container engine (podman or docker) driven from Python: found, called, and asked to build."""

from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# A wrapper that prepares podman and the base image, used when one lies beside the repository.
CONTAINER_ENV = ROOT.parent / "shared" / "tools" / "container-env"
IMAGE = "normserve:ci"
HOW_TO_RUN = (
    "no container engine: install podman (or docker) and make sure `podman info` (or "
    "`docker info`) answers, then run: python -m pytest -m container tests/container "
    "(or .ci/container)"
)
BUILD_TIMEOUT_S = 1800  # a cold build installs torch; a warm one takes seconds


@dataclass(frozen=True)
class Built:
    """An image a test built: its tag, the build's wall time, its size, what the build printed."""

    tag: str
    seconds: float
    size: int
    output: str


def _answers(cmd: list[str]) -> bool:
    try:
        return subprocess.run([*cmd, "info"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def find_engine() -> Engine | None:
    """The first engine that answers: the wrapper beside the repository, podman, docker."""
    if CONTAINER_ENV.is_file():
        cmd = [str(CONTAINER_ENV), "podman"]
        if _answers(cmd):
            return Engine(cmd)
    for name in ("podman", "docker"):
        exe = shutil.which(name)
        if exe and _answers([exe]):
            return Engine([exe])
    return None


class Engine:
    def __init__(self, cmd: list[str]) -> None:
        self.cmd = cmd
        self.is_podman = "podman" in Path(cmd[-1]).name

    def __call__(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([*self.cmd, *args], capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"`{' '.join(args[:2])} ...` exited {proc.returncode}:\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def build(self, context: Path, tag: str, *extra: str) -> tuple[str, float]:
        """Builds ``context`` as ``tag``; returns the build's output and its wall time."""
        # podman's default OCI format would drop HEALTHCHECK; docker always keeps it
        fmt = ["--format", "docker"] if self.is_podman else []
        t0 = time.monotonic()
        proc = self("build", *fmt, *extra, "-t", tag, str(context), timeout=BUILD_TIMEOUT_S)
        return proc.stdout + proc.stderr, time.monotonic() - t0

    def size(self, image: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())

    def layers(self, image: str) -> list[str]:
        out = self("image", "inspect", "--format", "{{range .RootFS.Layers}}{{.}} {{end}}", image)
        return out.stdout.split()

    def untag(self, tag: str) -> None:
        """Drops ``tag``. Under podman the image stays, untagged: ``podman rmi`` also deletes the
        untagged images it was built on when it sees no other image built on them, and those
        are the build cache (the next build would install torch again)."""
        self("untag" if self.is_podman else "rmi", tag, timeout=120, check=False)
