#!/usr/bin/env bash
# Durable sign-ups from 0 to N consumers, driven by wrk (BENCHMARKS.md, section 6):
#   bench/signups.sh [--consumers N] [--round S] [--connections C] [--depth D] [--managers M] [--stacks]
# Installs wrk if missing, builds the release control plane and the driver, runs it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
if ! command -v wrk >/dev/null; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get install -y wrk || { $sudo apt-get update && $sudo apt-get install -y wrk; }
fi
cargo build --release --package prealloc-control-plane --bin prealloc-control-plane
export CARGO_TARGET_DIR="$root/target"
cargo build --release --manifest-path bench/Cargo.toml --bin signups
export PREALLOC_CONTROL_PLANE="${PREALLOC_CONTROL_PLANE:-$root/target/release/prealloc-control-plane}"
exec "$root/target/release/signups" "$@"
