//! Reconciliation: bringing what runs on the nodes toward what the job store says should
//! run. A pass is a pure decision (`plan`: evictions, fences, resent starts, stops,
//! placements, over a snapshot) carried out by a thin executor (`execute`: store writes
//! and one commit, then commands to nodes through a [`NodeLink`]). `place` holds the pure
//! helpers placement needs (request, ledger, engine, a new generation's members).
//!
//! The loop ([`run`]) makes a pass when nodes connect or change, jobs are submitted, or
//! events arrive, and every half second; the simulation test drives
//! [`Reconciler::pass`] directly with its own clock and statuses.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use gantry_shared::api::Job;
use gantry_shared::now_ms;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::functions::FunctionService;
use crate::nodes::liveness::{Cluster, NodeStatus};
use crate::store::{Store, StoreError};

mod execute;
pub mod link;
mod place;
pub mod plan;
#[cfg(test)]
mod plan_tests;

pub use execute::Outcome;
pub use link::{ChannelLink, NodeLink, QuicLink};
pub use place::{Held, add_held, engine, ledger, node_info, request};
pub use plan::{Action, Memory, Snapshot};

/// The reconciler's state between passes and where its command tasks report.
pub struct Reconciler<L: NodeLink> {
    store: Store,
    /// Function containers: placed around the jobs, scaled after them in each pass.
    functions: Option<FunctionService>,
    link: L,
    memory: Memory,
    tasks: TaskTracker,
    reports: execute::Reports,
    /// Unbounded: at most one outcome per command sent, and commands are bounded by the
    /// live work; a bound would make a command task wait on the pass it reports to.
    outcomes: mpsc::UnboundedReceiver<Outcome>,
}

impl<L: NodeLink> Reconciler<L> {
    pub fn new(store: Store, link: L, functions: Option<FunctionService>) -> Self {
        let (tx, outcomes) = mpsc::unbounded_channel();
        Self {
            store,
            functions,
            link,
            memory: Memory::default(),
            tasks: TaskTracker::new(),
            reports: execute::Reports {
                tx,
                ready: Arc::new(Notify::new()),
            },
            outcomes,
        }
    }

    /// One pass at `now_ms` over `statuses`: applies the outcomes of earlier commands,
    /// plans, and executes the plan. Returns how many actions it took.
    pub fn pass(&mut self, statuses: &[NodeStatus], now_ms: u64) -> Result<usize, StoreError> {
        let mut outcomes = Vec::new();
        while let Ok(o) = self.outcomes.try_recv() {
            outcomes.push(o);
        }
        execute::apply_outcomes(&self.store, &mut self.memory, outcomes, now_ms)?;
        let warm = self
            .functions
            .as_ref()
            .map(FunctionService::held)
            .unwrap_or_default();
        let snapshot = Snapshot {
            now_ms,
            statuses,
            jobs: self.store.active_jobs()?,
            fences: self.store.all_fences()?,
            sessions: statuses
                .iter()
                .filter_map(|s| Some((s.id.clone(), self.link.session(&s.id)?)))
                .collect::<BTreeMap<_, _>>(),
            warm,
        };
        let sessions = snapshot.sessions.clone();
        let actions = plan::plan(snapshot, &mut self.memory);
        let n = actions.len();
        execute::execute(
            &self.store,
            &self.link,
            &self.tasks,
            &self.reports,
            actions,
            now_ms,
        )?;
        // Function containers go where the jobs (as just placed) and fences leave room.
        if let Some(functions) = &self.functions {
            let held = ledger(
                &self.store.active_jobs()?,
                &self.store.all_fences()?,
                now_ms,
            );
            if let Err(e) = functions.scale(statuses, held, &sessions, now_ms) {
                tracing::error!(error = %e, "function scaling step failed");
            }
        }
        Ok(n)
    }

    /// Fires when a command's outcome came back.
    pub fn outcome_ready(&self) -> Arc<Notify> {
        self.reports.ready.clone()
    }

    /// Waits (at most `bound`) for the commands still in flight.
    pub async fn drain(&self, bound: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(bound, self.tasks.wait()).await;
    }
}

/// Runs passes until `cancel`: when `changed` fires (a node connected or changed, a job was
/// submitted, events arrived), when a command's outcome comes back, and every half second.
pub async fn run<L: NodeLink>(
    store: Store,
    link: L,
    functions: Option<FunctionService>,
    cluster: Cluster,
    changed: Arc<Notify>,
    cancel: CancellationToken,
) {
    let mut reconciler = Reconciler::new(store, link, functions);
    let outcome = reconciler.outcome_ready();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = changed.notified() => {}
            _ = outcome.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        if let Err(e) = reconciler.pass(&cluster.statuses(), now_ms()) {
            tracing::error!(error = %e, "scheduling pass failed");
        }
    }
    // Commands in flight end with their connections, which shutdown closes.
    reconciler.drain(Duration::from_secs(1)).await;
}

/// Only placement, over `active` (the schedule benchmark's pass): records every new
/// generation and changed waiting reason with one commit, sends nothing. Returns the
/// placed jobs as recorded.
pub fn place_pending(
    store: &Store,
    statuses: &[NodeStatus],
    active: Vec<Job>,
) -> Result<Vec<Job>, StoreError> {
    let now = now_ms();
    let snapshot = Snapshot {
        now_ms: now,
        statuses,
        jobs: active,
        fences: store.all_fences()?,
        sessions: BTreeMap::new(),
        warm: BTreeMap::new(),
    };
    let (actions, jobs) = plan::plan_placements(snapshot);
    let (placed, _) = execute::apply(store, actions, now)?;
    let placed: std::collections::HashSet<_> = placed.into_iter().collect();
    Ok(jobs
        .into_iter()
        .filter(|j| placed.contains(&(j.id.clone(), j.generation())))
        .collect())
}
