//! Integration tests of the control plane, one module per feature.

mod allocator_props;
mod auth;
mod cli;
mod config;
mod durability;
mod provisioning;
mod registrations;
mod replication;
mod restart;
mod routes;
mod routes_props;
mod socket;
mod support;
