//! End-to-end harness: recording hyper managers, a routes stub, launchers for
//! real Envoy and the control plane, headless Chromium for the status page,
//! and throwaway PostgreSQL clusters.

pub mod browser;
pub mod client;
pub mod control_plane;
pub mod envoy;
pub mod manager;
pub mod postgres;
pub mod routes_stub;
pub mod server;
pub mod soak;
pub mod story;
