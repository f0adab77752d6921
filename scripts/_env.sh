# Sourced by scripts/serve and scripts/test: makes .venv ready, idempotently and fast when it is.
# Installs the CPU build of torch first (pinned, so pip never pulls a multi-GB CUDA build), then
# normserve in editable mode with its dev extra. Reinstalls only when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NORMSERVE_VENV:-$ROOT/.venv}"
TORCH_SPEC="${NORMSERVE_TORCH_SPEC:-torch==2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.normserve-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing $TORCH_SPEC and normserve[dev] into $VENV" >&2
  # (this machine's pip config names local mirror folders that may be absent: drop that noise)
  quiet() { "$@" 2> >(grep -v 'is neither a file nor a directory' >&2); }
  quiet "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
  quiet "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[dev]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
