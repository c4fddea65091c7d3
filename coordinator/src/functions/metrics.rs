//! What the functions export and show about their inputs: Prometheus histograms of each
//! phase (`gantry_input_phase_seconds{function, phase}`), counts of ended inputs by outcome,
//! and a recent window per function version for `gantry functions`: inputs ended in the
//! last minute and their p50/p99 latency. A web endpoint's requests count as its inputs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use gantry_shared::calls::{InputState, PhaseTimings};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::FunctionKey;
use super::state::InputRecord;

/// The recent window.
pub const WINDOW_MS: u64 = 60_000;
/// Ended inputs remembered per version in the window (its latencies' sample).
const WINDOW_CAP: usize = 10_000;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    /// `app/function`.
    function: String,
    /// queued, placement, image, startup, run, total.
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    function: String,
    /// succeeded, failed, cancelled.
    outcome: &'static str,
}

type HistogramFamily = Family<PhaseLabels, Histogram, fn() -> Histogram>;

fn phase_histogram() -> Histogram {
    // 1 ms to about 9 minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// Recent statistics of one version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recent {
    pub ended: u32,
    pub p50_ms: Option<u64>,
    pub p99_ms: Option<u64>,
}

pub struct InputMetrics {
    phases: HistogramFamily,
    outcomes: Family<OutcomeLabels, Counter>,
    /// Per version: (ended at, total ms) of inputs that ended lately.
    recent: Mutex<BTreeMap<FunctionKey, VecDeque<(u64, u64)>>>,
}

impl Default for InputMetrics {
    fn default() -> Self {
        Self {
            phases: Family::new_with_constructor(phase_histogram),
            outcomes: Family::default(),
            recent: Mutex::default(),
        }
    }
}

impl InputMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "input_phase_seconds",
            "Where function inputs' time went, by function and phase",
            self.phases.clone(),
        );
        registry.register(
            "inputs_ended",
            "Function inputs that ended, by function and outcome",
            self.outcomes.clone(),
        );
    }

    /// Counts an input that ended.
    pub fn ended(&self, input: &InputRecord) {
        let outcome = match input.state {
            InputState::Succeeded => "succeeded",
            InputState::Failed => "failed",
            InputState::Cancelled => "cancelled",
            InputState::Queued | InputState::Running => return,
        };
        let function = format!("{}/{}", input.key.app, input.key.function);
        self.outcomes
            .get_or_create(&OutcomeLabels {
                function: function.clone(),
                outcome,
            })
            .inc();
        self.observe(&function, &input.timings);
        if let (Some(total), Some(at)) = (input.timings.total_ms, input.ended_at_ms) {
            self.remember(&input.key, at, total);
        }
    }

    /// Counts a web request that ended at `now` (unix ms) with `timings`: its wait for a
    /// container (queued and, when that container started for it, its cold start), its
    /// run (from then to the end of its response) and its total; a 5xx is `failed`.
    pub fn web_request_ended(
        &self,
        key: &FunctionKey,
        timings: &PhaseTimings,
        status: u16,
        now: u64,
    ) {
        let function = format!("{}/{}", key.app, key.function);
        let outcome = if status >= 500 { "failed" } else { "succeeded" };
        self.outcomes
            .get_or_create(&OutcomeLabels {
                function: function.clone(),
                outcome,
            })
            .inc();
        self.observe(&function, timings);
        if let Some(total) = timings.total_ms {
            self.remember(key, now, total);
        }
    }

    /// Each phase `t` has, into its histogram.
    fn observe(&self, function: &str, t: &PhaseTimings) {
        for (phase, ms) in [
            ("queued", t.queued_ms),
            ("placement", t.placement_ms),
            ("image", t.image_ms),
            ("startup", t.startup_ms),
            ("run", t.run_ms),
            ("total", t.total_ms),
        ] {
            if let Some(ms) = ms {
                self.phases
                    .get_or_create(&PhaseLabels {
                        function: function.to_owned(),
                        phase,
                    })
                    .observe(ms as f64 / 1000.0);
            }
        }
    }

    /// A latency of `total` ms that ended at `at`, in `key`'s recent window.
    fn remember(&self, key: &FunctionKey, at: u64, total: u64) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let q = recent.entry(key.clone()).or_default();
        q.push_back((at, total));
        while q.len() > WINDOW_CAP {
            q.pop_front();
        }
    }

    /// Inputs of `key` that ended in the window before `now`, and their latencies.
    pub fn recent(&self, key: &FunctionKey, now: u64) -> Recent {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let Some(q) = recent.get_mut(key) else {
            return Recent::default();
        };
        while q.front().is_some_and(|(at, _)| at + WINDOW_MS < now) {
            q.pop_front();
        }
        let mut totals: Vec<u64> = q.iter().map(|(_, t)| *t).collect();
        totals.sort_unstable();
        let pick = |p: f64| -> Option<u64> {
            if totals.is_empty() {
                return None;
            }
            let i = ((totals.len() as f64 * p).ceil() as usize).clamp(1, totals.len()) - 1;
            Some(totals[i])
        };
        Recent {
            ended: totals.len() as u32,
            p50_ms: pick(0.50),
            p99_ms: pick(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_shared::calls::Payload;
    use gantry_shared::{AppName, CallId, FunctionName, InputId};

    fn ended(key: &FunctionKey, n: u32, total: u64, at: u64) -> InputRecord {
        let call = CallId::from_sequence(1);
        let mut i = InputRecord::new(
            InputId::of(&call, n),
            call,
            n,
            key.clone(),
            Payload::text("x"),
            0,
        );
        i.state = InputState::Succeeded;
        i.ended_at_ms = Some(at);
        i.timings.total_ms = Some(total);
        i.timings.run_ms = Some(total);
        i
    }

    #[test]
    fn the_window_gives_counts_and_percentiles_and_forgets_old_inputs() {
        let key = FunctionKey {
            app: AppName::new("a").expect("app"),
            version: 1,
            function: FunctionName::new("f").expect("fn"),
        };
        let m = InputMetrics::default();
        for n in 1..=100u32 {
            m.ended(&ended(&key, n, u64::from(n), 1_000));
        }
        let r = m.recent(&key, 2_000);
        assert_eq!((r.ended, r.p50_ms, r.p99_ms), (100, Some(50), Some(99)));
        assert_eq!(m.recent(&key, 1_000 + WINDOW_MS + 1).ended, 0);
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("input_phase_seconds_bucket{") && text.contains("phase=\"run\""),
            "{text}"
        );
        assert!(text.contains("function=\"a/f\""), "{text}");
    }
}
