#!/usr/bin/env bash
# The status page with many consumers in the database (BENCHMARKS.md, "Status page"):
#   bench/status-page.sh [--consumers N] [--reps R]     (defaults: 1000000, 10)
# Installs Chromium and Envoy's tools as `cargo xtask setup` does if missing,
# builds the release control plane and the driver, then runs it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v chromium >/dev/null || cargo xtask setup
cargo build --release --package prealloc-control-plane --bin prealloc-control-plane
export CARGO_TARGET_DIR="$root/target"
cargo build --release --manifest-path bench/Cargo.toml --bin status_page
export PREALLOC_CONTROL_PLANE="${PREALLOC_CONTROL_PLANE:-$root/target/release/prealloc-control-plane}"
exec "$root/target/release/status_page" "$@"
