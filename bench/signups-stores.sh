#!/usr/bin/env bash
# Durable sign-ups on SQLite and on PostgreSQL, one control plane each time,
# interleaved (BENCHMARKS.md, section 4): SQLite, PostgreSQL, SQLite, ...
#   bench/signups-stores.sh [--reps R] [other bench/signups.sh flags]
# BENCH_CASES="sqlite postgres postgres:/path/to/other/prealloc-control-plane"
# compares builds too (a case is a store, and optionally the binary to run).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
reps=2
if [ "${1:-}" = "--reps" ]; then reps=$2; shift 2; fi
command -v wrk >/dev/null || { echo "wrk missing: bench/signups.sh installs it" >&2; exit 1; }
cargo build --release --package prealloc-control-plane --bin prealloc-control-plane
CARGO_TARGET_DIR="$root/target" cargo build --release --manifest-path bench/Cargo.toml --bin signups
default_bin="${PREALLOC_CONTROL_PLANE:-$root/target/release/prealloc-control-plane}"
for rep in $(seq 1 "$reps"); do
  for case in ${BENCH_CASES:-sqlite postgres}; do
    store=${case%%:*}
    bin=$default_bin
    [ "$case" = "$store" ] || bin=${case#*:}
    echo "## rep $rep, store $store, $bin"
    PREALLOC_CONTROL_PLANE="$bin" "$root/target/release/signups" --store "$store" "$@"
  done
done
