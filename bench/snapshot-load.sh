#!/usr/bin/env bash
# A new Envoy receiving a big table from the real control plane (BENCHMARKS.md,
# "A new Envoy and a 1M table"), both builds, Envoy's default buffers:
#   bench/snapshot-load.sh [--consumers N] [--reps R]     (defaults: 1000000, 3)
# Installs Envoy and the wasm target as `cargo xtask setup` does if missing,
# builds the release control plane, both filter builds and the driver, then runs it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if [ ! -x "$root/.tools/venv/bin/envoy" ] || ! rustup target list --installed | grep -qx wasm32-wasip1; then
  cargo xtask setup
fi
cargo build --release --package prealloc-control-plane --bin prealloc-control-plane
cargo build --package prealloc-filter-wasm --target wasm32-wasip1 --release
cargo build --package prealloc-filter-native --release
export CARGO_TARGET_DIR="$root/target"
cargo build --release --manifest-path bench/Cargo.toml --bin snapshot_load
export PREALLOC_CONTROL_PLANE="${PREALLOC_CONTROL_PLANE:-$root/target/release/prealloc-control-plane}"
export PREALLOC_ENVOY="${PREALLOC_ENVOY:-$root/.tools/venv/bin/envoy}"
export PREALLOC_WASM="${PREALLOC_WASM:-$root/target/wasm32-wasip1/release/prealloc_filter.wasm}"
export PREALLOC_NATIVE="${PREALLOC_NATIVE:-$root/target/release/libprealloc_native.so}"
# The driver and the control plane on CPU 1, every Envoy on CPU 0.
if [ "$(nproc)" -ge 2 ]; then
  export BENCH_ENVOY_CPU=0
  exec taskset -c 1 "$root/target/release/snapshot_load" "$@"
fi
exec "$root/target/release/snapshot_load" "$@"
