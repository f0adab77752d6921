"""A rebuild after a source edit ships the new code, and takes the dependency layers from the cache.

The edit goes into a copy of the build context (the repository's files as git lists them), so the
working tree stays as it is; the image is rebuilt under one tag, with the cache of the image that
tests/container/test_image.py builds.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from ._engine import BUILD_TIMEOUT_S, ROOT, Built, Engine

pytestmark = pytest.mark.container

# a tag of its own per run: two runs on one engine must not remove each other's images
TAG = f"normserve:ci-rebuild-{uuid.uuid4().hex[:8]}"
# a module that every import of normserve runs, and one the wheel is built from
EDITED = Path("proto") / "normserve" / "__init__.py"


def _copy_build_context(src: Path, dst: Path) -> None:
    """The files of ``src`` that git tracks or would track (no .venv, no build outputs)."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        listed = ""  # not a git checkout (a source archive, say): copy all but the usual outputs
    if not listed:
        shutil.copytree(
            src,
            dst,
            ignore=shutil.ignore_patterns(
                ".git", ".venv", "build", "dist", "__pycache__", ".*_cache"
            ),
        )
        return
    for rel in filter(None, listed.split("\0")):
        if (src / rel).is_file():  # tracked but deleted in the working tree: not there
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)


def _marker_in(engine: Engine, tag: str) -> str:
    code = "import normserve; print(normserve._CI_REBUILD_MARKER)"
    out = engine("run", "--rm", "--no-healthcheck", "--entrypoint", "python", tag, "-c", code)
    return out.stdout.strip()


@pytest.mark.timeout(BUILD_TIMEOUT_S + 600)
def test_a_rebuild_after_a_source_edit_ships_the_new_code(
    engine: Engine, image: Built, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two edits, two builds under one tag: each image runs its own edit (a RUN that mounted the
    wheel stage was taken from podman's cache and shipped the old code)."""
    context = tmp_path / "context"
    _copy_build_context(ROOT, context)
    edited = context / EDITED
    original = edited.read_text()
    # the deps stage of the image the other test built: its layers must come back unchanged
    engine.build(ROOT, f"{TAG}-deps", "--target", "deps")
    deps_layers = engine.layers(f"{TAG}-deps")
    timings = []
    try:
        for build in ("first edit", "second edit"):
            marker = uuid.uuid4().hex
            edited.write_text(f'{original}\n_CI_REBUILD_MARKER = "{marker}"\n')
            _, seconds = engine.build(context, TAG)
            timings.append(f"{build} {seconds:.1f}s")
            assert _marker_in(engine, TAG) == marker, f"after the {build}, the image runs old code"
            layers = engine.layers(TAG)
            assert layers[: len(deps_layers)] == deps_layers, (
                f"after the {build}, the dependency layers were rebuilt, not taken from the cache"
            )
    finally:  # (podman keeps the images untagged: `podman image prune` removes them)
        engine.untag(TAG)
        engine.untag(f"{TAG}-deps")
    with capsys.disabled():
        print(f"\n[container] rebuilt {TAG} after a source edit: {', '.join(timings)}")
