//! GPUs on this host: what the agent has ([`inventory`]: NVML on real hardware, or a
//! simulated inventory declared in configuration), how healthy each is ([`health`]), and
//! how an assigned GPU gets into a container ([`inject`]).

pub mod health;
pub mod inject;
pub mod inventory;
pub mod nvml;
pub mod simulated;

pub use inject::{DeviceNode, GpuError, GpuInjection, HostPaths, injection};
