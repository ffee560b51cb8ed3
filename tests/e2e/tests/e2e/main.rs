//! End-to-end suite: the real Envoy 1.40 with the real prealloc_filter.wasm, recording managers, and a routes stub.

mod envoy_harness;
mod harness;
mod routes_stub;
