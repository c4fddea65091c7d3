//! gantry-coordinator: the cluster's control plane, grouped by domain.
//!
//! - `api/`: the HTTP API (axum), its extractors, errors and OpenAPI document.
//! - `auth`: API tokens and roles (stored hashed).
//! - `ca/`: the cluster CA; node certificates from join CSRs.
//! - `config`: the coordinator's TOML configuration.
//! - `control/`: the QUIC control endpoint with mutual TLS; sessions with agents.
//! - `jobs/`: job state transitions (pure) and the rank environment of gangs.
//! - `nodes/`: connected sessions, the liveness view (gossip + sessions), node admin
//!   state (drain, preempt) and one-time join tokens.
//! - `placement/`: the placement engine and its queue (pure).
//! - `reconcile/`: the scheduling loop: evictions, fences, starts and stops, placement
//!   over the store.
//! - `registry/`: the embedded OCI registry.
//! - `store/`: the durable job store (sled).
//! - `server`: assembles and runs all of it.

pub mod api;
pub mod auth;
pub mod ca;
pub mod config;
pub mod control;
pub mod jobs;
pub mod nodes;
pub mod placement;
pub mod reconcile;
pub mod registry;
pub mod server;
pub mod store;
