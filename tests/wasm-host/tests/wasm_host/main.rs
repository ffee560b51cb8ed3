//! Drives the real prealloc_filter.wasm through the wasmtime proxy-wasm host, one module per feature.

mod anonymous;
mod config;
mod cookies;
mod host_abi;
mod host_calls;
mod poller;
mod robustness;
mod routing;
mod signup;
mod support;
