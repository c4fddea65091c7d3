//! The autoscaler, as a pure decision per function version: from its demand (queued and
//! running inputs) and its containers, how many to start and which idle ones to drain.
//!
//! desired = ceil(demand / target) + buffer_containers while there is demand (target:
//! `target_inputs`, or a web endpoint's `target_concurrency`, its requests being its demand),
//! clamped to [min_containers, max_containers]; 0 demand wants min_containers. A version
//! that new calls no longer reach (superseded by a deploy, or its app stopped) wants no
//! containers beyond its demand and drains idle ones at once. Scale-up is immediate; a
//! container is drained only after it has been idle for `scaledown_window`, the longest
//! idle first, and never while it holds inputs.

use gantry_shared::WarmId;
use gantry_shared::functions::FunctionSpec;

/// What the autoscaler sees of one function version.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub queued: u32,
    pub running: u32,
    /// Placed or started, not ready yet.
    pub starting: u32,
    /// Ready containers: id, inputs held, idle since (unix ms).
    pub ready: Vec<(WarmId, u32, u64)>,
    /// Whether new calls go to this version.
    pub current: bool,
}

/// The decision for one version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scale {
    pub desired: u32,
    /// Containers to place.
    pub start: u32,
    /// Idle containers to drain.
    pub drain: Vec<WarmId>,
}

/// Containers the version wants for `demand` inputs.
pub fn desired(spec: &FunctionSpec, demand: u32, current: bool) -> u32 {
    if !current {
        return demand
            .div_ceil(spec.target_per_container())
            .min(spec.max_containers);
    }
    let want = if demand == 0 {
        0
    } else {
        demand.div_ceil(spec.target_per_container()) + spec.buffer_containers
    };
    want.clamp(spec.min_containers, spec.max_containers)
}

pub fn decide(spec: &FunctionSpec, obs: &Observed, now_ms: u64) -> Scale {
    let demand = obs.queued + obs.running;
    let desired = desired(spec, demand, obs.current);
    let live = obs.starting + obs.ready.len() as u32;
    let mut scale = Scale {
        desired,
        ..Scale::default()
    };
    if desired > live {
        scale.start = desired - live;
        return scale;
    }
    let window = if obs.current {
        spec.scaledown_window().as_millis() as u64
    } else {
        0
    };
    let mut idle: Vec<&(WarmId, u32, u64)> = obs
        .ready
        .iter()
        .filter(|(_, held, since)| *held == 0 && since.saturating_add(window) <= now_ms)
        .collect();
    idle.sort_by_key(|(id, _, since)| (*since, id.clone()));
    let excess = (live - desired) as usize;
    scale.drain = idle
        .into_iter()
        .take(excess)
        .map(|(id, _, _)| id.clone())
        .collect();
    scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::functions::AppManifest;

    fn spec(extra: &str) -> FunctionSpec {
        let m: AppManifest = toml::from_str(&format!(
            "app = \"a\"\n[functions.f]\nimage = \"busybox\"\n{extra}\n"
        ))
        .expect("manifest");
        m.validate().expect("valid");
        m.functions.into_values().next().expect("one function")
    }

    fn warm(n: u64) -> WarmId {
        WarmId::from_sequence(n)
    }

    #[test]
    fn desired_follows_demand_over_target_plus_buffer_within_bounds() {
        let s = spec("max_containers = 8\nmax_inputs = 4\nbuffer_containers = 1");
        assert_eq!(desired(&s, 0, true), 0);
        assert_eq!(desired(&s, 1, true), 2);
        assert_eq!(desired(&s, 4, true), 2);
        assert_eq!(desired(&s, 5, true), 3);
        assert_eq!(desired(&s, 1000, true), 8);
        let s = spec("min_containers = 2\ntarget_inputs = 1\nmax_inputs = 2");
        assert_eq!(desired(&s, 0, true), 2);
        assert_eq!(desired(&s, 3, true), 3);
        // A superseded version keeps only what its own demand needs.
        assert_eq!(desired(&s, 0, false), 0);
        assert_eq!(desired(&s, 3, false), 3);
    }

    #[test]
    fn a_queued_input_scales_from_zero_at_once() {
        let s = spec("");
        let obs = Observed {
            queued: 1,
            current: true,
            ..Observed::default()
        };
        assert_eq!(decide(&s, &obs, 0).start, 1);
        // Already starting one: nothing more.
        let obs = Observed { starting: 1, ..obs };
        assert_eq!(decide(&s, &obs, 0).start, 0);
    }

    #[test]
    fn idle_containers_drain_only_after_the_window_and_never_busy_ones() {
        let s = spec("scaledown_window = \"10s\"");
        let obs = Observed {
            ready: vec![(warm(1), 0, 1_000), (warm(2), 0, 5_000), (warm(3), 1, 0)],
            running: 1,
            current: true,
            ..Observed::default()
        };
        // desired 1 (one running input), live 3: two may go, but only once idle 10 s.
        assert!(decide(&s, &obs, 9_000).drain.is_empty());
        assert_eq!(decide(&s, &obs, 11_000).drain, vec![warm(1)]);
        assert_eq!(decide(&s, &obs, 15_000).drain, vec![warm(1), warm(2)]);
        // The busy one is never drained, even with no demand.
        let idle_all = Observed {
            running: 0,
            ..obs.clone()
        };
        assert!(!decide(&s, &idle_all, 1_000_000).drain.contains(&warm(3)));
    }

    #[test]
    fn min_containers_stay_and_superseded_versions_drain_at_once() {
        let s = spec("min_containers = 1");
        let obs = Observed {
            ready: vec![(warm(1), 0, 0), (warm(2), 0, 0)],
            current: true,
            ..Observed::default()
        };
        assert_eq!(decide(&s, &obs, 1_000_000).drain.len(), 1);
        let old = Observed {
            current: false,
            ..obs
        };
        assert_eq!(decide(&s, &old, 1).drain.len(), 2);
    }

    #[test]
    fn zero_to_many_is_one_decision() {
        let s = spec("max_containers = 200");
        let obs = Observed {
            queued: 500,
            current: true,
            ..Observed::default()
        };
        let d = decide(&s, &obs, 0);
        assert_eq!((d.desired, d.start), (200, 200));
    }
}
