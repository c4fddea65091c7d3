//! Where GPUs sit: NUMA nodes from sysfs, PCI bus ids, and NVLink groups (connected
//! components over NVLink, NVSwitch included).

use std::collections::BTreeMap;

use nvml_wrapper::Device;
use nvml_wrapper::error::NvmlError;

use super::NVLINK_MAX_LINKS;

/// The CPU-side NUMA node of the GPU's PCI device, from sysfs (`-1`: none). NVML's
/// `nvmlDeviceGetNumaNodeId` is not used: it gives the GPU's own memory node on platforms
/// where GPU memory is a NUMA node (Grace Hopper), not the node of the CPUs near it.
pub(super) fn sysfs_numa_node(index: u32, bus_id: &str) -> Option<u32> {
    let sysfs_id = canonical_bus_id(bus_id)?;
    let path = format!("/sys/bus/pci/devices/{sysfs_id}/numa_node");
    match std::fs::read_to_string(&path) {
        Ok(s) => parse_numa_node(&s),
        Err(e) => {
            tracing::debug!(index, path, error = %e, "cannot read the GPU's NUMA node");
            None
        }
    }
}

/// Contents of a sysfs `numa_node` file: a node number, or `-1` for none.
pub fn parse_numa_node(s: &str) -> Option<u32> {
    s.trim().parse::<u32>().ok()
}

/// A PCI bus id in sysfs form, `dddd:bb:dd.f` in lower case: NVML writes
/// `00000000:1B:00.0` (8-digit domain, upper case), sysfs `0000:1b:00.0`. A missing
/// domain is domain 0. `None` when `s` is not a bus id.
pub fn canonical_bus_id(s: &str) -> Option<String> {
    let s = s.trim();
    let parts: Vec<&str> = s.split(':').collect();
    let (domain, bus, dev_fn) = match parts.as_slice() {
        [domain, bus, dev_fn] => (u32::from_str_radix(domain, 16).ok()?, *bus, *dev_fn),
        [bus, dev_fn] => (0, *bus, *dev_fn),
        _ => return None,
    };
    let (dev, func) = dev_fn.split_once('.')?;
    let bus = u8::from_str_radix(bus, 16).ok()?;
    let dev = u8::from_str_radix(dev, 16).ok().filter(|d| *d < 32)?;
    let func = u8::from_str_radix(func, 16).ok().filter(|f| *f < 8)?;
    Some(format!("{domain:04x}:{bus:02x}:{dev:02x}.{func:x}"))
}

/// The PCI bus ids at the far end of a GPU's active NVLinks (a GPU or an NVSwitch).
pub(super) fn nvlink_remotes(device: &Device<'_>, index: u32) -> Vec<String> {
    let mut remotes = Vec::new();
    for link in 0..NVLINK_MAX_LINKS {
        let wrapper = device.link_wrapper_for(link);
        match wrapper.is_active() {
            Ok(true) => {}
            Ok(false) => continue,
            Err(NvmlError::NotSupported) if link == 0 => {
                tracing::debug!(index, "no NVLink on this GPU");
                break;
            }
            // Links past the GPU's own count answer InvalidArg or NotSupported.
            Err(e) => {
                tracing::debug!(index, link, error = %e, "cannot read NVLink state");
                continue;
            }
        }
        match wrapper.remote_pci_info() {
            Ok(pci) if !pci.bus_id.trim().is_empty() => remotes.push(pci.bus_id),
            Ok(_) => tracing::debug!(index, link, "active NVLink without a remote PCI bus id"),
            Err(e) => tracing::debug!(index, link, error = %e, "cannot read NVLink remote"),
        }
    }
    remotes
}

/// One GPU's NVLink view, the input of [`nvlink_groups`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuLinks {
    pub index: u32,
    /// The GPU's own PCI bus id, in any form [`canonical_bus_id`] reads.
    pub bus_id: String,
    /// Remote PCI bus id of each active link: another GPU, or an NVSwitch.
    pub remote_bus_ids: Vec<String>,
}

/// NVLink domains: GPU index → group, for every GPU at either end of an active link.
/// GPUs linked directly or through NVSwitches (any remote that is not one of `gpus`) share
/// a group; groups are numbered from 0 in order of their lowest GPU index. GPUs without
/// NVLink are absent. Bus ids are compared in [`canonical_bus_id`] form.
pub fn nvlink_groups(gpus: &[GpuLinks]) -> BTreeMap<u32, u32> {
    fn key(bus_id: &str) -> String {
        canonical_bus_id(bus_id).unwrap_or_else(|| bus_id.trim().to_ascii_lowercase())
    }
    fn find(parent: &mut [usize], mut n: usize) -> usize {
        while parent[n] != n {
            parent[n] = parent[parent[n]];
            n = parent[n];
        }
        n
    }
    // Nodes: the GPUs first (node i = gpus[i]), then each switch as first seen.
    let mut nodes: BTreeMap<String, usize> = BTreeMap::new();
    for (i, g) in gpus.iter().enumerate() {
        nodes.entry(key(&g.bus_id)).or_insert(i);
    }
    let mut parent: Vec<usize> = (0..gpus.len()).collect();
    let mut linked = vec![false; gpus.len()];
    for (i, g) in gpus.iter().enumerate() {
        for remote in &g.remote_bus_ids {
            let next = parent.len();
            let r = *nodes.entry(key(remote)).or_insert(next);
            if r == next {
                parent.push(next);
            }
            if r == i {
                continue; // A link to itself says nothing about peers.
            }
            linked[i] = true;
            if let Some(peer) = linked.get_mut(r) {
                *peer = true;
            }
            let (a, b) = (find(&mut parent, i), find(&mut parent, r));
            parent[a] = b;
        }
    }
    let mut order: Vec<usize> = (0..gpus.len()).filter(|&i| linked[i]).collect();
    order.sort_by_key(|&i| gpus[i].index);
    let mut numbers: BTreeMap<usize, u32> = BTreeMap::new();
    let mut groups = BTreeMap::new();
    for i in order {
        let root = find(&mut parent, i);
        let next = u32::try_from(numbers.len()).unwrap_or(u32::MAX);
        let group = *numbers.entry(root).or_insert(next);
        groups.insert(gpus[i].index, group);
    }
    groups
}
