//! prealloc routing filter: pure routing logic (natively tested) plus the proxy-wasm glue.
//!
//! Everything outside [`glue`] is plain Rust with no proxy-wasm dependency, so
//! it compiles and is unit tested natively; the glue only exists in the
//! `wasm32` build (`prealloc_filter.wasm`) and stays thin.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::unreachable,
        clippy::todo
    )
)]

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
