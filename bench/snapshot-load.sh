#!/usr/bin/env bash
# A new Envoy receiving a big table from the real control plane (BENCHMARKS.md,
# section 8), both builds, Envoy's default buffers:
#   bench/snapshot-load.sh [--consumers N] [--reps R] [--page-entries P] [--writes-per-turn W] [--managers M]
# (defaults: 1000000, 3, the control plane's and the poller's defaults).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. bench/common.sh
bench_build snapshot_load
# The driver and the control plane on CPU 1, every Envoy on CPU 0.
if [ "$(nproc)" -ge 2 ]; then
  export BENCH_ENVOY_CPU=0
  exec taskset -c 1 "$root/target/release/snapshot_load" "$@"
fi
exec "$root/target/release/snapshot_load" "$@"
