//! Drives the real prealloc_filter.wasm through the wasmtime proxy-wasm host, one module per feature.

mod host_abi;
