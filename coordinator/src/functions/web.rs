//! Web endpoints' traffic as the coordinator's ingress routes it (pure, in memory): the
//! requests in flight on each container and those waiting for one, per function version.
//! Nothing here is stored: requests do not outlive the coordinator's connections. The
//! autoscaler reads it as it reads inputs (waiting requests as queued ones, requests in
//! flight as running ones), and a container with requests in flight is not idle.

use std::collections::HashMap;

use gantry_shared::{NodeId, WarmId};

use super::FunctionKey;

#[derive(Debug, Default)]
pub struct WebTraffic {
    in_flight: HashMap<WarmId, u32>,
    waiting: HashMap<FunctionKey, u32>,
}

impl WebTraffic {
    /// A request takes the candidate (a ready container of its version, not in `skip`)
    /// with the fewest requests in flight, if one has fewer than `max_concurrency`.
    pub fn take(
        &mut self,
        candidates: &[(WarmId, NodeId)],
        max_concurrency: u32,
        skip: &[WarmId],
    ) -> Option<(WarmId, NodeId)> {
        let (id, node) = candidates
            .iter()
            .filter(|(id, _)| !skip.contains(id))
            .map(|(id, node)| (self.in_flight(id), id, node))
            .filter(|(n, _, _)| *n < max_concurrency)
            .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)))
            .map(|(_, id, node)| (id.clone(), node.clone()))?;
        *self.in_flight.entry(id.clone()).or_default() += 1;
        Some((id, node))
    }

    /// A request on `id` ended; true when it was the container's last.
    pub fn done(&mut self, id: &WarmId) -> bool {
        let Some(n) = self.in_flight.get_mut(id) else {
            return false;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.in_flight.remove(id);
            return true;
        }
        false
    }

    pub fn in_flight(&self, id: &WarmId) -> u32 {
        self.in_flight.get(id).copied().unwrap_or(0)
    }

    /// Requests waiting for a container of `key`.
    pub fn waiting(&self, key: &FunctionKey) -> u32 {
        self.waiting.get(key).copied().unwrap_or(0)
    }

    /// A request starts waiting for a container of `key`, unless `max` wait already
    /// (false).
    pub fn wait(&mut self, key: &FunctionKey, max: u32) -> bool {
        let n = self.waiting.entry(key.clone()).or_default();
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// A request stopped waiting (it got a container, or gave up).
    pub fn unwait(&mut self, key: &FunctionKey) {
        if let Some(n) = self.waiting.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.waiting.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warm(n: u64) -> (WarmId, NodeId) {
        (
            WarmId::from_sequence(n),
            NodeId::new(format!("n{n}")).expect("node"),
        )
    }

    #[test]
    fn requests_go_to_the_least_loaded_container_below_its_limit() {
        let mut t = WebTraffic::default();
        let c = [warm(1), warm(2)];
        let picks: Vec<WarmId> = (0..4)
            .filter_map(|_| t.take(&c, 2, &[]).map(|(id, _)| id))
            .collect();
        // Alternating, two each, then full.
        assert_eq!(
            picks,
            [
                c[0].0.clone(),
                c[1].0.clone(),
                c[0].0.clone(),
                c[1].0.clone()
            ]
        );
        assert_eq!(t.take(&c, 2, &[]), None);
        assert!(!t.done(&c[1].0));
        assert_eq!(t.take(&c, 2, &[]).map(|p| p.0), Some(c[1].0.clone()));
        // A skipped container is never taken.
        assert!(!t.done(&c[0].0));
        assert!(t.done(&c[0].0));
        assert_eq!(t.take(&c, 2, &[c[0].0.clone()]), None);
        assert_eq!(t.take(&c, 2, &[]).map(|p| p.0), Some(c[0].0.clone()));
    }

    #[test]
    fn waiting_is_bounded_per_version() {
        let mut t = WebTraffic::default();
        let key: FunctionKey = FunctionKey {
            app: "a".parse().expect("app"),
            version: 1,
            function: "f".parse().expect("function"),
        };
        assert!(t.wait(&key, 2));
        assert!(t.wait(&key, 2));
        assert!(!t.wait(&key, 2));
        assert_eq!(t.waiting(&key), 2);
        t.unwait(&key);
        assert!(t.wait(&key, 2));
    }
}
