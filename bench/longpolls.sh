#!/usr/bin/env bash
# Many Envoys long-polling one control plane (BENCHMARKS.md, section 7):
#   bench/longpolls.sh [--pollers N] [--changes C]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
cargo build --release --package prealloc-control-plane --bin prealloc-control-plane
export CARGO_TARGET_DIR="$root/target"
cargo build --release --manifest-path bench/Cargo.toml --bin longpolls
export PREALLOC_CONTROL_PLANE="${PREALLOC_CONTROL_PLANE:-$root/target/release/prealloc-control-plane}"
exec "$root/target/release/longpolls" "$@"
