//! prealloc control plane: pre-allocation, registration, replication tracking and
//! the routes push, as a library (tests drive [`App`] without a socket) and a binary.

// Layers, bottom up (a module imports only modules of the layers below it;
// `tests/it/layering.rs` checks it):
// 1. config, ids (consumer ids), store, registry (pure domain), routes, metrics, manager_client, pollers, sessions
// 2. batch (one group commit being built), command (the writes), state (shared core)
// 3. writer, allocator, replicator, expiry, api, status (the status page)
// 4. plane (wiring), server
pub mod allocator;
pub mod api;
pub mod batch;
pub mod command;
pub mod config;
pub mod expiry;
pub mod ids;
pub mod manager_client;
pub mod metrics;
pub mod plane;
pub mod pollers;
pub mod registry;
pub mod replicator;
pub mod routes;
pub mod server;
pub mod sessions;
pub mod state;
pub mod status;
pub mod store;
pub mod writer;

pub use api::App;
pub use config::Config;
pub use plane::ControlPlane;
pub use server::Server;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
