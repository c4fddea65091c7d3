//! gantry-agent: owns one GPU host. The binary only parses flags and calls in here:
//! [`serve`] assembles the daemon ([`daemon`]: the control session, attempts, GPU faults,
//! the event outbox), [`join`] joins a cluster, [`local`] holds the one-shot operator
//! commands. Below them: images (pull, import, content-addressed layer cache), the
//! container runtime (shims that run containers through libcontainer and outlive the
//! agent), GPU discovery and device injection, gossip, the local store, volumes and code
//! mounts (trees of registry blobs, cached by content).

pub mod code;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fsutil;
pub mod gossip;
pub mod gpu;
pub mod host;
pub mod image;
pub mod invoke;
pub mod join;
pub mod local;
pub mod preemption;
pub mod runtime;
pub mod serve;
pub mod store;
pub mod volumes;
