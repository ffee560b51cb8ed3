//! prealloc's native build: one Envoy 1.40 dynamic module (`libprealloc_native.so`)
//! holding the HTTP filter (`filter.rs`), the cluster specifier that routes
//! by its choice (`specifier.rs`) and the poller (`bootstrap.rs`).
//!
//! A thin glue like the wasm build's: it reads what Envoy shows, runs
//! [`prealloc_filter_core`] and applies the plans it returns. Envoy loads the
//! module once per process, so the routing table is process memory shared by
//! every worker (`state.rs`). No panic crosses the FFI boundary: every hook
//! body runs in `host::guarded`.

mod abi;
mod bootstrap;
mod filter;
mod host;
mod specifier;
mod state;

/// Called once, when Envoy loads the module: checks that this Envoy exports
/// every callback the module uses, and answers the ABI version it was built for.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const std::ffi::c_char {
    host::guarded("on_program_init", std::ptr::null(), || {
        let missing = abi::missing_imports();
        if !missing.is_empty() {
            // The log callback itself may be what is missing: stderr is always there.
            eprintln!(
                "prealloc_native: this module is built for Envoy 1.40 (dynamic modules ABI {}), \
                 and this Envoy does not export {}; use the Envoy release the module was built \
                 for (or the .wasm build, which runs on any Envoy with V8)",
                abi::ABI_VERSION,
                missing.join(", ")
            );
            return std::ptr::null();
        }
        abi::ABI_VERSION_C.as_ptr().cast()
    })
}
