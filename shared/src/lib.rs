//! Gantry's shared vocabulary: identifiers, resource quantities and the wire types that
//! cross process boundaries. No I/O lives here (no tokio, quinn, sled or libcontainer), so
//! every role can depend on it and every type can be tested as plain data.

pub mod api;
pub mod attempt;
pub mod calls;
pub mod chunks;
pub mod code;
pub mod config;
pub mod functions;
pub mod gossip;
pub mod gossip_key;
pub mod ids;
pub mod image_name;
pub mod protocol;
pub mod recipes;
pub mod resources;
pub mod schedules;
pub mod secrets;
pub mod volumes;

pub use attempt::{AttemptRef, EndCause, Generation, GpuFault, Owner, StartFailure};
pub use gossip_key::{BadGossipKey, GossipKey};
pub use ids::{
    AppName, CallId, ClusterId, ContainerId, FunctionName, IdError, InputId, JobId, NodeId, WarmId,
};
pub use resources::{
    CpuMillis, HumanDuration, MemoryBytes, Parsed, ResourceError, Resources, parse_memory,
};

/// The wall clock in unix milliseconds (0 if the clock is before 1970). Every timestamp
/// Gantry records or sends (`*_ms` fields) is in this unit.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
