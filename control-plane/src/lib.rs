//! prealloc control plane: pre-allocation, registration, replication tracking and
//! the routes push, as a library (tests drive [`App`] without a socket) and a binary.

pub mod allocator;
pub mod api;
pub mod config;
pub mod manager_client;
pub mod metrics;
pub mod plane;
pub mod registry;
pub mod replicator;
pub mod routes;
pub mod server;
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
