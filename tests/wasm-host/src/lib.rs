//! wasmtime proxy-wasm host (skeleton).
