#!/usr/bin/env bash
# Load-test a normserve server with `normserve bench`, then compare the runs.
#
# Shows the two ways to load a server: a closed loop (a fixed number of callers, each sending its
# next request when the last is answered: the throughput the server sustains) on TRAIN calls, and
# an open loop (requests sent at a fixed rate whatever the answers do: the latency a given load
# sees, queueing included) on EVAL calls. Each run is bounded (--duration seconds after a short
# warm-up), uses a fresh session that bench deletes afterwards, and writes its result as JSON;
# `normserve bench compare` then prints the two side by side. bench refuses targets that are not
# loopback unless you pass --allow-remote (after --, see below).
#
# Usage (with a server running, e.g. `scripts/serve` in another terminal, and normserve on PATH):
#
#   examples/load_test.sh [--target HOST:PORT] [--duration S] [--concurrency N] [--rate R]
#                         [--warmup S] [--shape N,C[,...]] [--out DIR] [--plot]
#                         [-- EXTRA BENCH FLAGS]
#
# --target defaults to $NORMSERVE_TARGET or 127.0.0.1:50051; --out to a new temporary folder
# (closed.json, open.json and, with --plot, closed.png there: needs matplotlib, the `plot` extra).
set -euo pipefail

target="${NORMSERVE_TARGET:-127.0.0.1:50051}"
duration=5
warmup=0.5
concurrency=4
rate=200
shape=64,256
out=""
plot=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --concurrency) concurrency="$2"; shift 2 ;;
    --rate) rate="$2"; shift 2 ;;
    --shape) shape="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --plot) plot=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "load_test.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || out="$(mktemp -d "${TMPDIR:-/tmp}/normserve-load.XXXXXX")"
mkdir -p "$out"

# a short warm-up keeps first-call costs (connection, session creation) out of the numbers
common=(--target "$target" --shape "$shape" --duration "$duration" --warmup "$warmup" --quiet)
plot_flags=()
[ "$plot" = 1 ] && plot_flags=(--plot "$out/closed.png")

echo "== closed loop: $concurrency callers, TRAIN, shape [$shape], ${duration}s"
normserve bench "${common[@]}" --mode train --concurrency "$concurrency" \
  --json "$out/closed.json" ${plot_flags[@]+"${plot_flags[@]}"} ${extra[@]+"${extra[@]}"}
echo
echo "== open loop: $rate requests/s, EVAL, shape [$shape], ${duration}s"
normserve bench "${common[@]}" --mode eval --rate "$rate" \
  --json "$out/open.json" ${extra[@]+"${extra[@]}"}
echo
echo "== closed.json vs open.json"
normserve bench compare "$out/closed.json" "$out/open.json"
echo
echo "results in $out"
