//! The real GPU source: NVML through `nvml-wrapper`.
//!
//! [`NvmlSource`] owns this process's NVML handle, the device handles of the GPUs it
//! discovered (by NVML index) and the event set that delivers their critical Xids and
//! double-bit ECC errors. It reads each GPU's identity, memory, PCI bus id, NUMA node
//! (from sysfs) and NVLink peers, and groups GPUs into NVLink domains with the pure
//! [`nvlink_groups`].
//!
//! Lifetimes: nvml-wrapper's `Device<'nvml>` and `EventSet<'nvml>` borrow the `Nvml` they
//! came from, while a [`GpuSource`] must be `Send + 'static`. The process initialises NVML
//! once and leaks it (`&'static Nvml`, see [`NvmlSource::open`]): it lives as long as the
//! agent does, NVML is never shut down explicitly (the driver cleans up at exit), and the
//! borrowed handles are then `'static` and `Send` (nvml-wrapper marks `Device` `Send + Sync`
//! and `EventSet` `Send`). No unsafe code.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use gantry_shared::gossip::GpuInfo;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, EventSet, Nvml};

use super::health::Throttle;
use super::inventory::{GpuSource, HealthEvent, InventoryError};

/// `NVML_NVLINK_MAX_LINKS` of the NVML header: links per GPU that can be queried.
pub const NVLINK_MAX_LINKS: u32 = 18;

/// Xid 79, "GPU has fallen off the bus". `HealthEvent` has no variant for a lost GPU, so a
/// GPU that NVML reports as lost (`NVML_ERROR_GPU_IS_LOST`) becomes this Xid, which
/// [`health::after_xid`] turns into `unhealthy:xid_79`.
pub const XID_GPU_LOST: u64 = 79;

/// The value NVML gives a critical Xid it cannot name (`XidError::Unknown`). Reported as
/// is, so the GPU becomes `unhealthy:xid_999`: a critical error is never ignored.
pub const XID_UNKNOWN: u64 = 999;

/// Events the source watches; each GPU is registered for those it supports.
mod events;
mod topology;

use events::{event_for_gpu, initial_health, newly_lost, register_events, sleep_until};
pub use events::{health_event, throttle_from};
pub use topology::{GpuLinks, canonical_bus_id, nvlink_groups, parse_numa_node};
use topology::{nvlink_remotes, sysfs_numa_node};

const WATCHED_EVENTS: EventTypes =
    EventTypes::CRITICAL_XID_ERROR.union(EventTypes::DOUBLE_BIT_ECC_ERROR);

/// Most events returned by one `wait_events` call; the rest wait for the next call.
const MAX_EVENT_BATCH: usize = 64;

/// This process's NVML, initialised on first successful [`NvmlSource::open`].
static NVML: Mutex<Option<&'static Nvml>> = Mutex::new(None);

/// GPUs through NVML. See the module docs.
pub struct NvmlSource {
    nvml: &'static Nvml,
    /// Discovered GPUs, by NVML index (ascending).
    gpus: Vec<NvmlGpu>,
    /// Critical Xid and double-bit ECC events of every GPU that supports them; `None` when
    /// no GPU does (or before discovery). Kept across `wait_events` calls.
    events: Option<EventSet<'static>>,
    /// Events found outside the event wait (a GPU lost while polling throttle reasons),
    /// returned by the next `wait_events`.
    pending: VecDeque<(u32, HealthEvent)>,
    /// GPUs already reported lost, so each is reported once.
    lost: BTreeSet<u32>,
}

struct NvmlGpu {
    index: u32,
    device: Device<'static>,
}

impl NvmlSource {
    /// Initialises NVML (once per process; later calls share it) from the driver's
    /// `libnvidia-ml.so.1`. Fails with [`InventoryError::NoNvml`] when the library cannot
    /// be loaded or the driver is not running, and with [`InventoryError::Nvml`] on any
    /// other failure (no permission, driver/library version mismatch). Never panics.
    pub fn open() -> Result<Self, InventoryError> {
        Ok(Self {
            nvml: shared_nvml()?,
            gpus: Vec::new(),
            events: None,
            pending: VecDeque::new(),
            lost: BTreeSet::new(),
        })
    }
}

fn shared_nvml() -> Result<&'static Nvml, InventoryError> {
    let mut slot = NVML.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(nvml) = *slot {
        return Ok(nvml);
    }
    let nvml = Nvml::init().map_err(|e| match e {
        NvmlError::LibloadingError(e) => InventoryError::NoNvml {
            reason: e.to_string(),
        },
        NvmlError::LibraryNotFound
        | NvmlError::FailedToLoadSymbol(_)
        | NvmlError::DriverNotLoaded => InventoryError::NoNvml {
            reason: e.to_string(),
        },
        e => nvml_error("initialising NVML", &e),
    })?;
    // One per process, alive until exit: the device and event handles borrow it.
    let nvml: &'static Nvml = Box::leak(Box::new(nvml));
    *slot = Some(nvml);
    Ok(nvml)
}

fn nvml_error(action: impl Into<String>, e: &NvmlError) -> InventoryError {
    InventoryError::Nvml {
        action: action.into(),
        reason: e.to_string(),
    }
}

impl GpuSource for NvmlSource {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    /// Every GPU NVML counts, except one that has fallen off the bus before it could be
    /// read (left out with a warning). Other failures reading a GPU's identity (UUID, name,
    /// memory, PCI bus id) fail discovery; the NUMA node, NVLink peers and health checks are
    /// best effort.
    fn discover(&mut self) -> Result<Vec<GpuInfo>, InventoryError> {
        let nvml = self.nvml;
        let count = nvml
            .device_count()
            .map_err(|e| nvml_error("counting GPUs", &e))?;
        let mut gpus = Vec::new();
        let mut infos = Vec::new();
        let mut links = Vec::new();
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(NvmlError::GpuLost) => {
                    tracing::warn!(
                        index,
                        "GPU has fallen off the bus; left out of the inventory"
                    );
                    continue;
                }
                Err(e) => return Err(nvml_error(format!("opening GPU {index}"), &e)),
            };
            let info = match read_gpu(&device, index) {
                Ok(info) => info,
                Err((what, NvmlError::GpuLost)) => {
                    tracing::warn!(
                        index,
                        what,
                        "GPU has fallen off the bus; left out of the inventory"
                    );
                    continue;
                }
                Err((what, e)) => {
                    return Err(nvml_error(format!("reading the {what} of GPU {index}"), &e));
                }
            };
            links.push(GpuLinks {
                index,
                bus_id: info.pci_bus_id.clone(),
                remote_bus_ids: nvlink_remotes(&device, index),
            });
            infos.push(info);
            gpus.push(NvmlGpu { index, device });
        }
        let groups = nvlink_groups(&links);
        for info in &mut infos {
            info.nvlink_group = groups.get(&info.index).copied();
        }
        // Free the previous set (if discovering again) before registering anew.
        self.events = None;
        self.events = register_events(nvml, &gpus);
        self.gpus = gpus;
        self.pending.clear();
        self.lost.clear();
        Ok(infos)
    }

    /// One batch: the first event NVML delivers within `timeout`, plus any already queued
    /// behind it. A lost GPU (`NVML_ERROR_GPU_IS_LOST`) is reported as `Xid(79)`.
    fn wait_events(&mut self, timeout: Duration) -> Vec<(u32, HealthEvent)> {
        if !self.pending.is_empty() {
            return self.pending.drain(..).collect();
        }
        let deadline = Instant::now() + timeout;
        let Some(set) = &self.events else {
            std::thread::sleep(timeout);
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut wait_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        while out.len() < MAX_EVENT_BATCH {
            match set.wait(wait_ms) {
                Ok(data) => {
                    out.extend(event_for_gpu(&self.gpus, data));
                    // Collect what is already queued, without waiting again.
                    wait_ms = 0;
                }
                Err(NvmlError::Timeout) => break,
                Err(NvmlError::GpuLost) => {
                    out.extend(newly_lost(&self.gpus, &mut self.lost));
                    // NVML keeps answering "lost" at once; don't spin on it.
                    sleep_until(deadline);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for GPU health events failed");
                    sleep_until(deadline);
                    break;
                }
            }
        }
        out
    }

    fn throttle(&mut self, index: u32) -> Option<Throttle> {
        let gpu = self.gpus.iter().find(|g| g.index == index)?;
        match gpu.device.current_throttle_reasons() {
            Ok(reasons) => Some(throttle_from(reasons)),
            Err(NvmlError::GpuLost) => {
                if self.lost.insert(index) {
                    self.pending
                        .push_back((index, HealthEvent::Xid(XID_GPU_LOST)));
                }
                None
            }
            Err(e) => {
                tracing::debug!(index, error = %e, "cannot read throttle reasons");
                None
            }
        }
    }
}

/// The identity of a GPU and its health at start; `Err` names the field that failed.
fn read_gpu(device: &Device<'_>, index: u32) -> Result<GpuInfo, (&'static str, NvmlError)> {
    let uuid = device.uuid().map_err(|e| ("UUID", e))?;
    let model = device.name().map_err(|e| ("name", e))?;
    let memory_bytes = device.memory_info().map_err(|e| ("memory size", e))?.total;
    let pci_bus_id = device.pci_info().map_err(|e| ("PCI bus id", e))?.bus_id;
    let numa_node = sysfs_numa_node(index, &pci_bus_id);
    Ok(GpuInfo {
        index,
        uuid,
        model,
        memory_bytes,
        pci_bus_id,
        numa_node,
        nvlink_group: None,
        health: initial_health(device, index),
        simulated: false,
    })
}

/// The value of an optional query: `None` (logged) when it fails. NotSupported is normal
/// (consumer GPUs, ECC off, older architectures) and logged at debug.
fn optional<T>(index: u32, what: &str, result: Result<T, NvmlError>) -> Option<T> {
    match result {
        Ok(v) => Some(v),
        Err(NvmlError::NotSupported) => {
            tracing::debug!(index, what, "not supported by this GPU");
            None
        }
        Err(e) => {
            tracing::warn!(index, what, error = %e, "cannot read from GPU");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use gantry_shared::gossip::GpuHealth;
    use nvml_wrapper::bitmasks::device::ThrottleReasons;
    use nvml_wrapper::enums::event::XidError;

    use crate::gpu::health;

    fn gpu(index: u32, bus_id: &str, remotes: &[&str]) -> GpuLinks {
        GpuLinks {
            index,
            bus_id: bus_id.into(),
            remote_bus_ids: remotes.iter().map(|r| r.to_string()).collect(),
        }
    }

    /// NVML's form of the bus id of GPU `i` (bus 0x10 + i).
    fn bus(i: u32) -> String {
        format!("00000000:{:02X}:00.0", 0x10 + i)
    }

    #[test]
    fn bus_ids_take_the_sysfs_form() {
        let cases = [
            ("00000000:1B:00.0", Some("0000:1b:00.0")),
            ("0000:1b:00.0", Some("0000:1b:00.0")),
            (" 00000001:DB:1F.7\n", Some("0001:db:1f.7")),
            ("1B:00.0", Some("0000:1b:00.0")),
            ("00000000:1B:00", None),
            ("00000000:1B:20.0", None),
            ("00000000:1B:00.8", None),
            ("0:0:0:0.0", None),
            ("", None),
            ("gpu", None),
        ];
        for (input, want) in cases {
            assert_eq!(canonical_bus_id(input).as_deref(), want, "{input:?}");
        }
    }

    #[test]
    fn numa_node_files() {
        assert_eq!(parse_numa_node("-1\n"), None);
        assert_eq!(parse_numa_node("0\n"), Some(0));
        assert_eq!(parse_numa_node("3"), Some(3));
        assert_eq!(parse_numa_node(""), None);
    }

    #[test]
    fn gpus_behind_nvswitches_form_one_group() {
        // HGX: every GPU links to the same four switches; GPUs and switches report the
        // switches' bus ids in different cases.
        let switches = [
            "00000000:A1:00.0",
            "00000000:a2:00.0",
            "0000:a3:00.0",
            "00000000:A4:00.0",
        ];
        let gpus: Vec<GpuLinks> = (0..8)
            .map(|i| {
                let remotes: Vec<&str> = switches.iter().copied().cycle().take(18).collect();
                gpu(i, &bus(i), &remotes)
            })
            .collect();
        let groups = nvlink_groups(&gpus);
        assert_eq!(groups, (0..8).map(|i| (i, 0)).collect());
    }

    #[test]
    fn direct_islands_are_numbered_by_lowest_gpu() {
        // Islands {1,3,5,7} and {0,2,4,6}, listed odd island first.
        let island = |members: [u32; 4]| {
            members.map(|m| {
                let peers: Vec<String> = members
                    .iter()
                    .filter(|&&p| p != m)
                    .map(|&p| bus(p).to_lowercase())
                    .collect();
                let peers: Vec<&str> = peers.iter().map(String::as_str).collect();
                gpu(m, &bus(m), &peers)
            })
        };
        let gpus: Vec<GpuLinks> = island([1, 3, 5, 7])
            .into_iter()
            .chain(island([0, 2, 4, 6]))
            .collect();
        let groups = nvlink_groups(&gpus);
        for i in 0..8 {
            assert_eq!(groups.get(&i), Some(&(i % 2)), "GPU {i}");
        }
    }

    #[test]
    fn gpus_without_links_have_no_group() {
        let gpus = vec![
            gpu(0, &bus(0), &[]),
            gpu(1, &bus(1), &[&bus(2)]),
            // GPU 2 reports nothing, but GPU 1 sees a link to it.
            gpu(2, &bus(2), &[]),
            // A link back to itself is no peer.
            gpu(3, &bus(3), &[&bus(3)]),
        ];
        let groups = nvlink_groups(&gpus);
        assert_eq!(groups, BTreeMap::from([(1, 0), (2, 0)]));
        assert!(nvlink_groups(&[]).is_empty());
    }

    #[test]
    fn separate_switch_planes_are_separate_groups() {
        let gpus = vec![
            gpu(0, &bus(0), &["00000000:A1:00.0"]),
            gpu(1, &bus(1), &["00000000:B1:00.0"]),
            gpu(2, &bus(2), &["00000000:a1:00.0"]),
            gpu(3, &bus(3), &["00000000:b1:00.0"]),
            // Bridges both planes.
            gpu(4, &bus(4), &[]),
        ];
        let groups = nvlink_groups(&gpus);
        assert_eq!(groups, BTreeMap::from([(0, 0), (1, 1), (2, 0), (3, 1)]));
        let mut bridged = gpus;
        bridged[4] = gpu(4, &bus(4), &["00000000:A1:00.0", "00000000:B1:00.0"]);
        let groups = nvlink_groups(&bridged);
        assert_eq!(groups, (0..5).map(|i| (i, 0)).collect());
    }

    #[test]
    fn nvml_events_become_health_events() {
        let xid = EventTypes::CRITICAL_XID_ERROR;
        assert_eq!(
            health_event(xid, Some(XidError::Value(48))),
            Some(HealthEvent::Xid(48))
        );
        assert_eq!(
            health_event(xid, Some(XidError::Unknown)),
            Some(HealthEvent::Xid(XID_UNKNOWN))
        );
        assert_eq!(
            health_event(EventTypes::DOUBLE_BIT_ECC_ERROR, None),
            Some(HealthEvent::DoubleBitEcc)
        );
        assert_eq!(health_event(EventTypes::PSTATE_CHANGE, None), None);
        assert_eq!(
            health::after_xid(XID_GPU_LOST),
            Some(GpuHealth::Unhealthy(gantry_shared::attempt::GpuFault::Xid(
                79
            )))
        );
    }

    #[test]
    fn throttle_reasons_that_matter() {
        let t = throttle_from(ThrottleReasons::HW_THERMAL_SLOWDOWN | ThrottleReasons::GPU_IDLE);
        assert_eq!(
            t,
            Throttle {
                hw_thermal: true,
                ..Throttle::default()
            }
        );
        let t = throttle_from(
            ThrottleReasons::SW_THERMAL_SLOWDOWN | ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN,
        );
        assert!(t.sw_thermal && t.hw_power_brake && !t.hw_thermal);
        assert_eq!(throttle_from(ThrottleReasons::empty()), Throttle::default());
    }

    /// Without the driver (this CI host) opening fails with a message that says to install
    /// it; on a GPU host, discovery must work.
    #[test]
    fn open_needs_the_driver_or_discovers() {
        match NvmlSource::open() {
            Err(e @ InventoryError::NoNvml { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("NVIDIA driver"), "{msg}");
                assert!(msg.contains("libnvidia-ml"), "{msg}");
            }
            Err(e) => panic!("NVML loaded but failed: {e}"),
            Ok(mut source) => {
                assert_eq!(source.kind(), "nvml");
                let gpus = source.discover().expect("discovery on a GPU host");
                for (i, g) in gpus.iter().enumerate() {
                    assert!(!g.simulated && !g.uuid.is_empty(), "GPU {i}: {g:?}");
                    assert!(canonical_bus_id(&g.pci_bus_id).is_some(), "{g:?}");
                }
                // A short wait returns (no faults expected on a test host).
                let _ = source.wait_events(Duration::from_millis(10));
                if let Some(g) = gpus.first() {
                    let _ = source.throttle(g.index);
                }
            }
        }
    }
}
