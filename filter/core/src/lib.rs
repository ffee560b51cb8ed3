//! prealloc's routing logic, pure: plain Rust with no host dependency, unit
//! and property tested natively, shared by both builds of the data plane.
//!
//! The glues (`filter/wasm`, the proxy-wasm build; `filter/native`, the
//! Envoy dynamic module) only read host state, hand it to this crate, and
//! apply the plans it returns.
//!
//! No input may make the data plane panic (a panic traps the wasm VM and
//! would take Envoy down in the native module): the workspace's
//! `[workspace.lints.clippy]` denies `unwrap`, `expect`, `panic!`, indexing
//! and their kin outside tests in these crates, and `cargo xtask test` runs
//! clippy natively and for wasm32.
pub mod buckets;
pub mod config;
pub mod cookie;
pub mod decision;
pub mod headers;
pub mod metrics;
pub mod pipeline;
pub mod poller;
pub mod process_table;
pub mod signup;
pub mod table;
