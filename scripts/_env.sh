# Sourced by scripts/serve and scripts/test: makes .venv ready, idempotently and fast when it is.
# Installs torch first, pinned (so that normserve's own `torch>=2.4` is already met and pip pulls no
# other build), then normserve in editable mode with its dev extra. Reinstalls only when
# pyproject.toml or the torch choice changes.
#
# Which build of torch: the CPU one, unless you ask for another. Before installing, pip is asked
# (--dry-run) what `torch==2.13.0` resolves to on your index; if that is the CUDA build (on Linux the
# standard index has only that one: ~900 MB plus several GB of nvidia-* packages), setup stops
# before downloading anything and says how to choose:
#   NORMSERVE_TORCH_INDEX_URL=<PyTorch's CPU wheel index>   the CPU build from PyTorch's own index
#   NORMSERVE_TORCH_SPEC='torch==2.13.0'                     whatever your index gives, CUDA included
#   NORMSERVE_TORCH_SPEC='torch==2.13.0+cu128' NORMSERVE_TORCH_INDEX_URL=...   any other build
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NORMSERVE_VENV:-$ROOT/.venv}"
TORCH_SPEC="${NORMSERVE_TORCH_SPEC:-torch==2.13.0}"
TORCH_INDEX="${NORMSERVE_TORCH_INDEX_URL:-}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.normserve-installed"
want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16) $TORCH_SPEC $TORCH_INDEX"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # (a pip config may name find-links folders that do not exist everywhere: drop that noise)
  quiet() { "$@" 2> >(grep -v 'is neither a file nor a directory' >&2); }
  pip_() { quiet "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
  torch_args=("$TORCH_SPEC")
  [ -n "$TORCH_INDEX" ] && torch_args+=(--index-url "$TORCH_INDEX")
  if [ -z "${NORMSERVE_TORCH_SPEC:-}" ] && [ -z "$TORCH_INDEX" ] \
     && ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
    # The default: the CPU build. Ask pip what it would install, without installing it (when pip
    # cannot say, e.g. an old pip without --report, setup goes on as before).
    report="$(pip_ install --quiet --dry-run --ignore-installed --report - "${torch_args[@]}" 2>/dev/null || true)"
    if [ -n "$report" ] && printf '%s' "$report" | "$VENV/bin/python" -c 'import json, sys
r = json.load(sys.stdin)
sys.exit(0 if any(i["metadata"]["name"].startswith("nvidia-") for i in r["install"]) else 1)'
    then
      cat >&2 <<EOM
setup: on this machine's package index, $TORCH_SPEC is the CUDA build of torch (several GB with
its nvidia-* packages). normserve runs on the CPU build (~200 MB) as well, and setup installs that
one by default; your index does not have it. Choose, then rerun:
  export NORMSERVE_TORCH_INDEX_URL=...   PyTorch's CPU wheel index: the --index-url that the
                                         install selector on pytorch.org shows for Linux, Pip, CPU
  export NORMSERVE_TORCH_SPEC=$TORCH_SPEC   to install the CUDA build anyway (for a GPU server)
EOM
      exit 1
    fi
  fi
  echo "setup: installing $TORCH_SPEC${TORCH_INDEX:+ from $TORCH_INDEX} and normserve[dev] into $VENV (a minute or two the first time)" >&2
  pip_ install --quiet "${torch_args[@]}"
  pip_ install --quiet -e "$ROOT[dev]"
  echo "setup: done: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "(CUDA " + torch.version.cuda + ")" if torch.version.cuda else "(CPU build)")' 2>/dev/null)" >&2
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
