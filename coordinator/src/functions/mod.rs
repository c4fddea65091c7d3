//! Functions: deployed apps, calls of their functions, and the warm containers that run
//! them. A warm container is an attempt whose owner is a function ([`Owner::Function`]),
//! placed by the same engine as jobs (in the reconciler's pass, over one ledger), started
//! by the same agents, and fed inputs through the runtime API its agent serves.
//!
//! - [`state`]: the queues, leases and containers, and their transitions (pure);
//! - [`autoscale`]: how many containers a version wants (pure);
//! - [`chunks`]: inputs' streamed chunks, bounded, in memory (pure);
//! - [`clock`]: where the service reads the time (the simulation's is virtual);
//! - [`metrics`]: phase histograms for `/metrics` and each version's recent latencies;
//! - [`service`]: what the API does (deploy, call, read, cancel), what node events and
//!   outputs do, the scaling step of each reconcile pass, and the router that sends
//!   inputs, drains and stops to nodes;
//! - [`web`]: web endpoints' requests in flight and waiting (pure, in memory), which the
//!   ingress takes containers through and the autoscaler reads as demand.
//!
//! [`Owner::Function`]: gantry_shared::Owner::Function

pub mod autoscale;
pub mod chunks;
pub mod clock;
pub mod metrics;
pub mod service;
pub mod state;
pub mod web;

use std::fmt;

use gantry_shared::{AppName, FunctionName};
use serde::{Deserialize, Serialize};

pub use service::{FunctionService, FunctionServiceError, Outbound};

/// One function of one deployment version: what a queue and its containers belong to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FunctionKey {
    pub app: AppName,
    pub version: u64,
    pub function: FunctionName,
}

impl fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} (version {})",
            self.app, self.function, self.version
        )
    }
}
