#!/usr/bin/env bash
# Propagation through the real control plane to 1 and 10 real Envoys
# (BENCHMARKS.md, section 9):
#   bench/propagation.sh [--envoys E] [--changes C] [--build wasm|native]
# (defaults: 1 Envoy, 1000 changes, native).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. bench/common.sh
bench_build propagation
exec "$root/target/release/propagation" "$@"
