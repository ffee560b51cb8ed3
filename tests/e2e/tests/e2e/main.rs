//! End-to-end suite: the real Envoy 1.40 with the real prealloc_filter.wasm, recording managers, and a routes stub.

mod support;

mod all_down;
mod anonymous;
mod control_plane;
mod demo;
mod docs;
mod envoy_harness;
mod forged_cookie;
mod harness;
mod pinned;
mod poller_faults;
mod propagation;
mod round_robin;
mod routes_stub;
mod signup;
mod signup_failures;
mod spoofing;
mod story;
mod story_load;
mod upgrade;
