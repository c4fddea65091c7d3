//! gantry-coordinator: the cluster's control plane. Today: the cluster CA, one-time join
//! tokens and the QUIC control endpoint with mutual TLS. Placement, the job store, the
//! HTTP API and the embedded registry are not built yet.

pub mod admin;
pub mod api;
pub mod auth;
pub mod ca;
pub mod cluster;
pub mod config;
pub mod control;
pub mod engine;
pub mod jobs;
pub mod join;
pub mod nodes;
pub mod ranks;
pub mod registry;
pub mod scheduler;
pub mod server;
pub mod store;
