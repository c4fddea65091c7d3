//! GPU health from NVML: the checks at start (ECC, retired pages, row remapping), the
//! critical-Xid and double-bit-ECC events, lost GPUs, and throttling.

use std::collections::BTreeSet;
use std::time::Instant;

use gantry_shared::gossip::GpuHealth;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::enums::device::SampleValue;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::event::EventData;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::sys_exports::field_id::{
    NVML_FI_DEV_REMAPPED_FAILURE, NVML_FI_DEV_REMAPPED_PENDING,
};
use nvml_wrapper::{Device, EventSet, Nvml};

use super::{NvmlGpu, WATCHED_EVENTS, XID_GPU_LOST, XID_UNKNOWN, optional};
use crate::gpu::health::{self, Throttle};
use crate::gpu::inventory::HealthEvent;

/// A GPU's health at start: unhealthy (`ecc_dbe`) when its memory already has
/// uncorrectable errors since the driver loaded, pages pending retirement (pre-Ampere) or
/// row remapping pending or failed (Ampere and later). Checks a GPU does not support are
/// skipped.
pub(super) fn initial_health(device: &Device<'_>, index: u32) -> GpuHealth {
    let dbe = optional(
        index,
        "volatile uncorrected ECC errors",
        device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
    );
    if let Some(n @ 1..) = dbe {
        tracing::warn!(index, errors = n, "GPU has uncorrectable ECC errors");
        return health::after_double_bit_ecc();
    }
    let pending = optional(
        index,
        "pages pending retirement",
        device.are_pages_pending_retired(),
    );
    if pending == Some(true) {
        tracing::warn!(index, "GPU has memory pages pending retirement; reset it");
        return health::after_double_bit_ecc();
    }
    let fields = [
        FieldId(NVML_FI_DEV_REMAPPED_PENDING),
        FieldId(NVML_FI_DEV_REMAPPED_FAILURE),
    ];
    let samples = optional(index, "row remapping", device.field_values_for(&fields));
    let whats = ["row remapping pending", "row remapping failure"];
    for (what, sample) in whats.into_iter().zip(samples.into_iter().flatten()) {
        let value = sample.and_then(|s| s.value);
        if optional(index, what, value).is_some_and(|v| is_nonzero(&v)) {
            tracing::warn!(index, what, "GPU memory needs attention");
            return health::after_double_bit_ecc();
        }
    }
    GpuHealth::Healthy
}

pub(super) fn is_nonzero(v: &SampleValue) -> bool {
    match *v {
        SampleValue::F64(x) => x != 0.0,
        SampleValue::U32(x) => x != 0,
        SampleValue::U64(x) => x != 0,
        SampleValue::I64(x) => x != 0,
    }
}

/// Registers every GPU for the watched events it supports. NVML frees the set when a
/// registration fails, so a failing GPU is left out (with a warning) and the set rebuilt.
pub(super) fn register_events(nvml: &'static Nvml, gpus: &[NvmlGpu]) -> Option<EventSet<'static>> {
    let wanted: Vec<(&NvmlGpu, EventTypes)> = gpus
        .iter()
        .filter_map(|g| {
            let supported = optional(g.index, "event types", g.device.supported_event_types())?;
            let types = supported & WATCHED_EVENTS;
            if types.is_empty() {
                tracing::debug!(index = g.index, "GPU reports no Xid or ECC events");
                return None;
            }
            Some((g, types))
        })
        .collect();
    let mut skip = BTreeSet::new();
    'attempt: loop {
        let mut set = match nvml.create_event_set() {
            Ok(set) => set,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot create an NVML event set; GPU Xids and ECC errors will not be seen"
                );
                return None;
            }
        };
        let mut any = false;
        for (gpu, types) in &wanted {
            if skip.contains(&gpu.index) {
                continue;
            }
            match gpu.device.register_events(*types, set) {
                Ok(s) => {
                    set = s;
                    any = true;
                }
                Err(e) => {
                    tracing::warn!(
                        index = gpu.index,
                        error = %e.error,
                        "cannot watch GPU events; its Xids and ECC errors will not be seen"
                    );
                    skip.insert(gpu.index);
                    continue 'attempt;
                }
            }
        }
        return any.then_some(set);
    }
}

/// The GPU and health event of an NVML event; `None` for other events or unknown GPUs.
pub(super) fn event_for_gpu(
    gpus: &[NvmlGpu],
    data: EventData<'static>,
) -> Option<(u32, HealthEvent)> {
    let index = match data.device.index() {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(
                error = %e,
                event = ?data.event_type,
                "health event from a GPU NVML cannot name"
            );
            return None;
        }
    };
    if !gpus.iter().any(|g| g.index == index) {
        tracing::warn!(index, "health event from a GPU not in the inventory");
        return None;
    }
    let event = health_event(data.event_type, data.event_data)?;
    Some((index, event))
}

/// The health event of an NVML event type (and its Xid).
pub fn health_event(types: EventTypes, xid: Option<XidError>) -> Option<HealthEvent> {
    if types.contains(EventTypes::CRITICAL_XID_ERROR) {
        Some(HealthEvent::Xid(match xid {
            Some(XidError::Value(x)) => x,
            Some(XidError::Unknown) | None => XID_UNKNOWN,
        }))
    } else if types.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
        Some(HealthEvent::DoubleBitEcc)
    } else {
        None
    }
}

/// GPUs that answer "lost" and were not reported yet, as `Xid(79)` events.
pub(super) fn newly_lost(gpus: &[NvmlGpu], lost: &mut BTreeSet<u32>) -> Vec<(u32, HealthEvent)> {
    let mut out = Vec::new();
    for g in gpus {
        if !lost.contains(&g.index) && matches!(g.device.memory_info(), Err(NvmlError::GpuLost)) {
            lost.insert(g.index);
            out.push((g.index, HealthEvent::Xid(XID_GPU_LOST)));
        }
    }
    if out.is_empty() && lost.is_empty() {
        tracing::warn!("NVML reports a lost GPU but every GPU still answers");
    }
    out
}

pub(super) fn sleep_until(deadline: Instant) {
    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
}

/// The throttle reasons that matter for health.
pub fn throttle_from(reasons: ThrottleReasons) -> Throttle {
    Throttle {
        hw_thermal: reasons.contains(ThrottleReasons::HW_THERMAL_SLOWDOWN),
        sw_thermal: reasons.contains(ThrottleReasons::SW_THERMAL_SLOWDOWN),
        hw_power_brake: reasons.contains(ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN),
    }
}
