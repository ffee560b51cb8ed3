//! Integration tests of the control plane, one module per feature.

mod allocator_props;
mod auth;
mod bad_input;
mod cli;
mod config;
mod durability;
mod layering;
mod leases;
mod provisioning;
mod registrations;
mod replication;
mod restart;
mod route_window;
mod routes;
mod routes_props;
mod settled;
mod shared;
mod socket;
mod status;
mod storage_faults;
mod store_parity;
mod support;
