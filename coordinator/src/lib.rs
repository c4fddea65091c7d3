//! gantry-coordinator: the cluster's control plane, grouped by domain.
//!
//! - `api/`: the HTTP API (axum): handlers that call the services, extractors, errors and
//!   the OpenAPI document.
//! - `builds`: images built from recipes into the embedded registry, step by step, with
//!   a cache by step; the steps that run are work for agents.
//! - `ca/`: the cluster CA; node certificates from join CSRs.
//! - `config`: the coordinator's settings (`coordinator.toml`, flags laid over it).
//! - `images`: whether a submitted job's or function's short image name is anywhere (the
//!   registry, or a node's own store as gossip lists it).
//! - `control/`: the QUIC control endpoint with mutual TLS; sessions with agents.
//! - `jobs/`: job state transitions (pure), the rank environment of gangs, and the job
//!   service the API calls.
//! - `nodes/`: connected sessions, the liveness view (gossip + sessions) and the node
//!   service the API calls.
//! - `placement/`: the placement engine and its queue (pure).
//! - `reconcile/`: the reconciler: a pure plan per pass (evictions, fences, starts, stops,
//!   placements) and its executor, commands to agents through a `NodeLink`.
//! - `registry/`: the embedded OCI registry.
//! - `schedules`: functions and job templates run on a cron expression or a period.
//! - `secrets`: secrets encrypted at rest (AES-256-GCM under a key file), resolved into a
//!   container's start only.
//! - `store/`: everything durable (sled), one module per kind of record: jobs and fences
//!   (mod), API tokens and roles (`tokens`), join tokens and joined nodes (`joins`), node
//!   drain/preempt state (`node_admin`), the volumes' records (`volumes::VolumeStore`, over
//!   a tree the store opens). Nothing else opens a sled tree.
//! - `volumes/`: volumes recorded and resolved into the specs that mount them, made,
//!   removed and their files streamed on the nodes that hold them.
//! - `server`: assembles and runs all of it.

pub mod api;
pub mod builds;
pub mod ca;
pub mod config;
pub mod control;
pub mod functions;
pub mod images;
pub mod ingress;
pub mod jobs;
pub mod nodes;
pub mod placement;
pub mod reconcile;
pub mod registry;
pub mod schedules;
pub mod secrets;
pub mod server;
pub mod store;
pub mod volumes;
