# Sourced by the benchmark scripts that run the release control plane and
# real Envoys: `bench_build <driver binary>` installs Envoy and the wasm target
# as `cargo xtask setup` does if missing, builds the release control plane,
# both filter builds and the driver, and exports where each is.
bench_build() {
  if [ ! -x "$root/.tools/venv/bin/envoy" ] || ! rustup target list --installed | grep -qx wasm32-wasip1; then
    cargo xtask setup
  fi
  cargo build --release --package prealloc-control-plane --bin prealloc-control-plane
  cargo build --package prealloc-filter-wasm --target wasm32-wasip1 --release
  cargo build --package prealloc-filter-native --release
  CARGO_TARGET_DIR="$root/target" cargo build --release --manifest-path bench/Cargo.toml --bin "$1"
  export PREALLOC_CONTROL_PLANE="${PREALLOC_CONTROL_PLANE:-$root/target/release/prealloc-control-plane}"
  export PREALLOC_ENVOY="${PREALLOC_ENVOY:-$root/.tools/venv/bin/envoy}"
  export PREALLOC_WASM="${PREALLOC_WASM:-$root/target/wasm32-wasip1/release/prealloc_filter.wasm}"
  export PREALLOC_NATIVE="${PREALLOC_NATIVE:-$root/target/release/libprealloc_native.so}"
}
