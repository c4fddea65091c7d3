//! Gantry's shared vocabulary: identifiers, resource quantities and the wire types that
//! cross process boundaries. No I/O lives here (no tokio, quinn, sled or libcontainer), so
//! every role can depend on it and every type can be tested as plain data.

pub mod api;
pub mod gossip;
pub mod ids;
pub mod protocol;
pub mod resources;

pub use ids::{ClusterId, ContainerId, IdError, JobId, NodeId};
pub use resources::{CpuMillis, ResourceError, Resources, parse_memory};
