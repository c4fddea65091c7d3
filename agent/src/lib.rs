//! gantry-agent: owns one GPU host. Today: images (pull, import, content-addressed layer
//! cache), the container runtime (shims that run containers through libcontainer and
//! outlive the agent), GPU device injection and the local store.

pub mod config;
pub mod control;
pub mod daemon;
pub mod fsutil;
pub mod gossip;
pub mod gpu;
pub mod image;
pub mod preemption;
pub mod runtime;
pub mod store;
