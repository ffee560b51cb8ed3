#!/usr/bin/env bash
# Durable sign-ups on 1, 2 and 3 control planes sharing one PostgreSQL
# database, against SQLite and unshared PostgreSQL, interleaved; then
# propagation across instances (BENCHMARKS.md, section 4):
#   bench/instances.sh [--reps R] [--seconds S] [--connections C] [--depth D] [--samples N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
command -v wrk >/dev/null || { echo "wrk missing: bench/signups.sh installs it" >&2; exit 1; }
cargo build --release --package prealloc-control-plane --bin prealloc-control-plane
CARGO_TARGET_DIR="$root/target" cargo build --release --manifest-path bench/Cargo.toml --bin instances
export PREALLOC_CONTROL_PLANE="${PREALLOC_CONTROL_PLANE:-$root/target/release/prealloc-control-plane}"
exec "$root/target/release/instances" "$@"
