//! prealloc routing filter: pure routing logic (natively tested) plus the proxy-wasm glue.
//!
//! Everything outside [`glue`] is plain Rust with no proxy-wasm dependency, so
//! it compiles and is unit tested natively; the glue only exists in the
//! `wasm32` build (`prealloc_filter.wasm`) and stays thin.
//!
//! No input may make the filter panic (a panic traps the VM): `Cargo.toml`'s
//! `[lints.clippy]` denies `unwrap`, `expect`, `panic!`, indexing and their
//! kin outside tests, and `cargo xtask test` runs clippy for the wasm target
//! too, so the glue is held to it.
pub mod config;
pub mod cookie;
pub mod decision;
pub mod headers;
pub mod metrics;
pub mod poller;
pub mod signup;
pub mod table;

#[cfg(target_arch = "wasm32")]
mod glue;
