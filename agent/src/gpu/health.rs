//! Turning what NVML reports (Xid errors, ECC counts, throttle reasons) into a GPU's health.
//! Pure functions, shared by the real and the simulated inventory.

use gantry_shared::GpuFault;
use gantry_shared::gossip::GpuHealth;

/// Xids caused by the application, not the GPU (illegal memory access, graphics engine
/// exception from a bad kernel, a killed context, preemptive cleanup, …): reported to the
/// job, never held against the GPU. The same set the NVIDIA Kubernetes device plugin skips.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// The health an Xid leaves a GPU in: `None` for application Xids (no change), otherwise
/// unhealthy with reason `xid_<n>`.
pub fn after_xid(xid: u64) -> Option<GpuHealth> {
    if APPLICATION_XIDS.contains(&xid) {
        None
    } else {
        Some(GpuHealth::Unhealthy(GpuFault::Xid(xid_u32(xid))))
    }
}

/// NVML reports Xids as u64; every real one is small.
fn xid_u32(xid: u64) -> u32 {
    u32::try_from(xid).unwrap_or(u32::MAX)
}

/// A double-bit (uncorrectable) ECC error: the GPU's memory can no longer be trusted.
pub fn after_double_bit_ecc() -> GpuHealth {
    GpuHealth::Unhealthy(GpuFault::DoubleBitEcc)
}

/// Health from a polled temperature and the active clock-throttle reasons. An unhealthy
/// GPU stays unhealthy (only an operator clears it); otherwise hardware or software
/// thermal slowdown and hardware power brake make it degraded, anything else healthy.
pub fn after_poll(current: &GpuHealth, throttle: Throttle) -> GpuHealth {
    if current.is_unhealthy() {
        return current.clone();
    }
    let reason = if throttle.hw_thermal {
        Some("hw_thermal_slowdown")
    } else if throttle.sw_thermal {
        Some("sw_thermal_slowdown")
    } else if throttle.hw_power_brake {
        Some("hw_power_brake")
    } else {
        None
    };
    match reason {
        Some(r) => GpuHealth::Degraded(r.into()),
        None => GpuHealth::Healthy,
    }
}

/// The clock-throttle reasons that matter for health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Throttle {
    pub hw_thermal: bool,
    pub sw_thermal: bool,
    pub hw_power_brake: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn application_xids_leave_the_gpu_alone() {
        for xid in [13, 31, 43, 45, 68, 109] {
            assert_eq!(after_xid(xid), None, "xid {xid}");
        }
        for xid in [48, 63, 64, 74, 79, 92, 94, 95, 119] {
            assert_eq!(
                after_xid(xid),
                Some(GpuHealth::Unhealthy(GpuFault::Xid(xid_u32(xid)))),
                "xid {xid}"
            );
        }
    }

    #[test]
    fn throttling_degrades_but_never_heals_an_unhealthy_gpu() {
        let hot = Throttle {
            hw_thermal: true,
            ..Throttle::default()
        };
        assert_eq!(
            after_poll(&GpuHealth::Healthy, hot),
            GpuHealth::Degraded("hw_thermal_slowdown".into())
        );
        assert_eq!(
            after_poll(&GpuHealth::Degraded("x".into()), Throttle::default()),
            GpuHealth::Healthy
        );
        let bad = after_double_bit_ecc();
        assert_eq!(after_poll(&bad, Throttle::default()), bad);
    }
}
