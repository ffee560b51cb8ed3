//! End-to-end suite: the real Envoy 1.40 running each build of the data plane
//! (`prealloc_filter.wasm`, `libprealloc_native.so`), recording managers, a
//! routes stub and the real control plane. Tests written with `each_build!`
//! run once per build.

#[macro_use]
mod support;

mod all_down;
mod anonymous;
mod builds;
mod control_plane;
mod demo;
mod docs;
mod envoy_harness;
mod faults;
mod forged_cookie;
mod harness;
mod leases;
mod observability;
mod pinned;
mod poller_faults;
mod postgres_harness;
mod postgres_store;
mod propagation;
mod robustness;
mod round_robin;
mod routes_stub;
mod secrets;
mod signup;
mod signup_failures;
mod soak;
mod spoofing;
mod status_page;
mod story;
mod story_load;
mod upgrade;
