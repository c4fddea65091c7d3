//! GPUs on this host: what the agent has ([`inventory`]: NVML on real hardware, or a
//! simulated inventory declared in configuration), how healthy each is ([`health`]), and
//! how an assigned GPU gets into a container ([`inject`]: from a CDI spec ([`cdi`]) or
//! from the host's devices and driver files ([`driver`], found through the linker cache,
//! [`ldcache`]), as the pieces in [`edits`]).

pub mod cdi;
pub mod driver;
pub mod edits;
pub mod health;
pub mod inject;
pub mod inventory;
pub mod ldcache;
pub mod nvml;
pub mod simulated;

pub use inject::{DeviceNode, DriverSource, GpuConfig, GpuError, GpuInjection, injection};
