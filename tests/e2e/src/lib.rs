//! End-to-end harness: recording hyper managers, a routes stub, launchers for
//! real Envoy and the control plane, and headless Chromium for the status page.

pub mod browser;
pub mod client;
pub mod control_plane;
pub mod envoy;
pub mod manager;
pub mod routes_stub;
pub mod server;
pub mod soak;
pub mod story;
