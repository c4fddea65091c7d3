//! The coordinator's view of the cluster: every joined node as up, suspect or down, with
//! what it reports through gossip (address, labels, state, free capacity, GPUs).
//!
//! Two signals feed one decision ([`decide`], pure):
//! - **gossip**: the coordinator is a chitchat member; chitchat's phi-accrual detector says
//!   whether the node's member (the run of the agent that holds the session) is live;
//! - **the control session**: open and *fresh* (something received within
//!   `session_silence`; agents send QUIC keep-alives every 500 ms), open but *silent*, or
//!   closed.
//!
//! Both good: up (its gossiped state: ready, draining or preempting). One bad: suspect (no
//! new work is placed there). Both bad: down. A poll loop recomputes the view every
//! `poll` and wakes the scheduler on any change. Nothing here is persisted: the view is
//! rebuilt from gossip and sessions after a restart; only the register of joined nodes
//! (written at join) survives, so a node that never comes back is still listed, as down.
//!
//! Gossip is advisory. Placement reserves against the coordinator's own ledger and the
//! capacity declared on the authenticated session; gossip can keep a node from being
//! chosen (suspect, draining, an unhealthy GPU) but never make room that is not there.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_membership::{
    GossipTransport, Member, MemberView, MembershipConfig, MembershipError, Traffic,
};
use gantry_shared::gossip::{self, AgentGossip};
use gantry_shared::now_ms;
use gantry_shared::protocol::NodeCapacity;
use gantry_shared::{ClusterId, GossipKey, NodeId};
use tokio_util::sync::CancellationToken;

use crate::nodes::Nodes;
use crate::store::joins::JoinTokens;
use crate::store::node_admin::{AdminMode, AdminState, NodeAdmin};

/// The coordinator's member name in gossip (never a valid node id).
pub const COORDINATOR_MEMBER: &str = "@coordinator";

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub membership: MembershipConfig,
    /// A session with nothing received for this long is silent.
    pub session_silence: Duration,
    /// How often the view is recomputed.
    pub poll: Duration,
    /// After the coordinator starts, a node not heard from yet is suspect, not down, for
    /// this long: agents reconnect (backoff up to 5 s) and reconcile; only then are the
    /// silent ones down and their work lost.
    pub startup_grace: Duration,
    /// Where gossip travels: UDP in the product, an in-process network in tests.
    pub transport: GossipTransport,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            membership: MembershipConfig::default(),
            session_silence: Duration::from_millis(1500),
            poll: Duration::from_millis(100),
            startup_grace: Duration::from_secs(15),
            transport: GossipTransport::Udp,
        }
    }
}

/// The control session's signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionSignal {
    /// Open, and something arrived within `session_silence`.
    Fresh,
    /// Open, but nothing arrived within `session_silence`.
    Silent,
    /// Closed since the coordinator started.
    Closed,
    /// Never opened since the coordinator started.
    Never,
}

/// Gossip's signal for the node's current member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GossipSignal {
    Live,
    /// Known, and declared dead by the failure detector.
    Dead,
    /// Not (or no longer) known to gossip.
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Liveness {
    Up,
    Suspect,
    Down,
}

/// The liveness decision, with the reason for anything but up. `starting`: the
/// coordinator is within its startup grace; `restarting`: the node's agent said it is
/// restarting and its time has not run out.
pub fn decide(
    session: SessionSignal,
    gossip: GossipSignal,
    starting: bool,
    restarting: bool,
) -> (Liveness, &'static str) {
    use GossipSignal as G;
    use SessionSignal as S;
    match (session, gossip) {
        (S::Silent | S::Closed | S::Never, G::Dead | G::Absent) if restarting => (
            Liveness::Suspect,
            "its agent is restarting (it said it would be back shortly); its work stays",
        ),
        (S::Never, G::Dead | G::Absent) if starting => (
            Liveness::Suspect,
            "not heard from since the coordinator started; waiting for it to reconnect",
        ),
        (S::Fresh, G::Live) => (Liveness::Up, ""),
        (S::Fresh, G::Dead) => (Liveness::Suspect, "gossip declares it dead"),
        (S::Fresh, G::Absent) => (Liveness::Suspect, "no gossip from it yet"),
        (S::Silent, G::Live) => (Liveness::Suspect, "control session silent"),
        (S::Closed, G::Live) => (Liveness::Suspect, "no control session"),
        (S::Never, G::Live) => (
            Liveness::Suspect,
            "gossiping, but not connected since the coordinator started",
        ),
        (S::Silent, _) => (Liveness::Down, "control session silent and no gossip"),
        (S::Closed, _) => (Liveness::Down, "control session closed and no gossip"),
        (S::Never, _) => (Liveness::Down, "not seen since the coordinator started"),
    }
}

/// One node as the coordinator sees it.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub id: NodeId,
    pub liveness: Liveness,
    /// Why it is suspect or down; empty when up.
    pub reason: &'static str,
    /// When it entered its current liveness (unix ms).
    pub since_ms: u64,
    /// When a heartbeat or control traffic last arrived from it (unix ms).
    pub last_seen_ms: Option<u64>,
    pub connected: bool,
    /// As declared on its latest control session.
    pub capacity: Option<NodeCapacity>,
    /// What it gossips (its current member's values).
    pub gossip: Option<AgentGossip>,
    /// Why its gossip could not be read, if it could not.
    pub gossip_error: Option<String>,
    /// An operator's drain or a preemption notice.
    pub admin: Option<AdminState>,
}

impl NodeStatus {
    /// `ready`, `draining`, `preempting`, `suspect` or `down`.
    pub fn state(&self) -> &'static str {
        match self.liveness {
            Liveness::Up => match self.admin.as_ref().map(|a| a.mode) {
                Some(AdminMode::Preempt) => "preempting",
                Some(AdminMode::Drain) => "draining",
                None => "ready",
            },
            Liveness::Suspect => "suspect",
            Liveness::Down => "down",
        }
    }

    /// New work may go here.
    pub fn placeable(&self) -> bool {
        self.liveness == Liveness::Up
            && self.admin.is_none()
            && self.capacity.is_some()
            && self.gossip.is_some()
    }

    /// GPUs never to place on.
    pub fn unhealthy_gpus(&self) -> BTreeSet<u32> {
        self.gossip
            .iter()
            .flat_map(|g| &g.gpus)
            .filter(|g| g.health.is_unhealthy())
            .map(|g| g.index)
            .collect()
    }
}

/// What the poll loop remembers about a node between rounds.
#[derive(Default)]
struct Tracked {
    liveness: Option<(Liveness, u64)>,
    last_seen_ms: Option<u64>,
    /// Connection id, datagrams received, when that count last grew.
    rx: Option<(usize, u64, Instant)>,
    /// Member generation and heartbeat last seen.
    heartbeat: Option<(u64, u64)>,
    capacity: Option<NodeCapacity>,
    had_session: bool,
    /// The agent run of the latest session.
    instance: Option<u64>,
}

/// The cluster view, kept current by a task. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    member: Arc<Member>,
    view: Arc<Mutex<Vec<NodeStatus>>>,
    /// Counts recomputations of the view, for waiting on the next one.
    refreshed: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Cluster {
    /// Joins gossip in `cluster` (its id, and the key its datagrams are authenticated
    /// with) and starts keeping the view; runs until `cancel` fires.
    pub async fn start(
        cfg: ClusterConfig,
        cluster: (&ClusterId, &GossipKey),
        endpoints: (&str, &str),
        nodes: Nodes,
        joined: JoinTokens,
        admin: NodeAdmin,
        cancel: CancellationToken,
    ) -> Result<Self, MembershipError> {
        let member = Arc::new(
            Member::start_on(
                &cfg.transport,
                COORDINATOR_MEMBER,
                now_ms(),
                cluster.0.as_str(),
                cluster.1,
                &cfg.membership,
                gossip::coordinator_key_values(endpoints.0, endpoints.1),
            )
            .await?,
        );
        tracing::info!(gossip = %member.gossip_addr(), "gossiping");
        let this = Self {
            member: member.clone(),
            view: Arc::default(),
            refreshed: Arc::new(tokio::sync::watch::Sender::new(0)),
        };
        let view = this.view.clone();
        let refreshed = this.refreshed.clone();
        tokio::spawn(async move {
            let mut tracked: HashMap<NodeId, Tracked> = HashMap::new();
            let started = Instant::now();
            let mut tick = tokio::time::interval(cfg.poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let members = member.members().await;
                let joined = joined.joined().unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot read the joined nodes");
                    Vec::new()
                });
                let sessions = nodes.sessions();
                contact_new_members(&member, &members, &sessions);
                let restarting = |id: &NodeId| nodes.is_restarting(id);
                let clock = Clock {
                    started,
                    now: Instant::now(),
                    now_ms: now_ms(),
                };
                let mut next = observe(
                    &cfg,
                    clock,
                    &mut tracked,
                    &joined,
                    &sessions,
                    &restarting,
                    &members,
                );
                match admin.all() {
                    Ok(states) => {
                        for s in &mut next {
                            s.admin = states.get(&s.id).cloned();
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot read node drain/preempt states"),
                }
                let changed = {
                    let mut current = view.lock().unwrap_or_else(|e| e.into_inner());
                    let changed = summary(&current) != summary(&next);
                    *current = next;
                    changed
                };
                if changed {
                    nodes.changed.notify_one();
                }
                refreshed.send_modify(|n| *n += 1);
            }
            match Arc::try_unwrap(member) {
                Ok(m) => m.shutdown().await,
                Err(_) => tracing::debug!("gossip member still shared at shutdown"),
            }
        });
        Ok(this)
    }

    pub fn gossip_addr(&self) -> SocketAddr {
        self.member.gossip_addr()
    }

    /// What the coordinator's gossip moved and dropped (for `/metrics`).
    pub fn gossip_traffic(&self) -> Arc<Traffic> {
        self.member.traffic()
    }

    /// Every joined or connected node, by id.
    pub fn statuses(&self) -> Vec<NodeStatus> {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the view satisfies `ready` (checked now and after each recomputation),
    /// at most `bound`; says whether it did.
    pub async fn wait_until(
        &self,
        ready: impl Fn(&[NodeStatus]) -> bool,
        bound: std::time::Duration,
    ) -> bool {
        let mut refreshed = self.refreshed.subscribe();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            if ready(&self.statuses()) {
                return true;
            }
            tokio::select! {
                r = refreshed.changed() => if r.is_err() { return false },
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

/// What makes two views differ for the scheduler: liveness, state, capacity, GPU health.
fn summary(
    view: &[NodeStatus],
) -> Vec<(NodeId, &'static str, Option<NodeCapacity>, BTreeSet<u32>)> {
    view.iter()
        .map(|s| (s.id.clone(), s.state(), s.capacity, s.unhealthy_gpus()))
        .collect()
}

/// Agents that said hello with a gossip address gossip does not know yet are contacted,
/// so a node is seen without waiting for it to find the coordinator.
fn contact_new_members(
    member: &Member,
    members: &[MemberView],
    sessions: &[(NodeId, crate::nodes::Session)],
) {
    for (_, s) in sessions {
        if let Some(addr) = s.gossip
            && !members.iter().any(|m| m.gossip_addr == addr)
        {
            member.contact(addr);
        }
    }
}

/// The times one round decides with, read once by its caller.
#[derive(Debug, Clone, Copy)]
struct Clock {
    /// When the coordinator started (its startup grace runs from here).
    started: Instant,
    now: Instant,
    /// The same moment in unix ms (what the view reports).
    now_ms: u64,
}

/// One round: the signals of every known node, the decision, and the status.
fn observe(
    cfg: &ClusterConfig,
    clock: Clock,
    tracked: &mut HashMap<NodeId, Tracked>,
    joined: &[NodeId],
    sessions: &[(NodeId, crate::nodes::Session)],
    restarting: &dyn Fn(&NodeId) -> bool,
    members: &[MemberView],
) -> Vec<NodeStatus> {
    let Clock {
        started,
        now,
        now_ms,
    } = clock;
    let sessions: BTreeMap<&NodeId, &crate::nodes::Session> =
        sessions.iter().map(|(id, s)| (id, s)).collect();
    let mut ids: BTreeSet<NodeId> = joined.iter().cloned().collect();
    ids.extend(sessions.keys().map(|id| (*id).clone()));
    ids.extend(tracked.keys().cloned());
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let t = tracked.entry(id.clone()).or_default();
        let session = sessions
            .get(&id)
            .filter(|s| s.conn.close_reason().is_none());
        let session_signal = match session {
            Some(s) => {
                t.had_session = true;
                t.capacity = Some(s.capacity);
                t.instance = Some(s.instance);
                let (conn, count) = (s.conn.stable_id(), s.conn.stats().udp_rx.datagrams);
                match t.rx {
                    Some((c, n, _)) if c == conn && n == count => {}
                    _ => {
                        t.rx = Some((conn, count, now));
                        t.last_seen_ms = Some(now_ms);
                    }
                }
                let quiet = t.rx.map_or(Duration::ZERO, |(_, _, at)| now - at);
                if quiet < cfg.session_silence {
                    SessionSignal::Fresh
                } else {
                    SessionSignal::Silent
                }
            }
            None if t.had_session => SessionSignal::Closed,
            None => SessionSignal::Never,
        };
        // The member of the agent run holding (or last holding) the session; without one,
        // the newest run gossip knows.
        let member = members
            .iter()
            .filter(|m| m.node == id.as_str())
            .filter(|m| t.instance.is_none_or(|i| m.generation == i))
            .max_by_key(|m| m.generation);
        let gossip_signal = match member {
            Some(m) if m.live => GossipSignal::Live,
            Some(m) if m.dead => GossipSignal::Dead,
            // Just appeared: not enough heartbeats to judge yet.
            _ => GossipSignal::Absent,
        };
        if let Some(m) = member {
            let hb = (m.generation, m.heartbeat);
            if t.heartbeat.is_some_and(|old| old != hb) {
                t.last_seen_ms = Some(now_ms);
            }
            t.heartbeat = Some(hb);
        }
        let (gossip, gossip_error) = match member {
            Some(m) => match AgentGossip::decode(|k| m.key_values.get(k).map(String::as_str)) {
                Ok(g) => (Some(g), None),
                Err(e) => (None, Some(e.to_string())),
            },
            None => (None, None),
        };
        let starting = now.duration_since(started) < cfg.startup_grace;
        let (liveness, reason) = decide(session_signal, gossip_signal, starting, restarting(&id));
        let since_ms = match t.liveness {
            Some((l, at)) if l == liveness => at,
            previous => {
                match liveness {
                    Liveness::Up => tracing::info!(node = %id, "node is up"),
                    _ if previous.is_some() || liveness == Liveness::Suspect => {
                        tracing::warn!(node = %id, state = ?liveness, reason, "node is not up")
                    }
                    _ => {}
                }
                t.liveness = Some((liveness, now_ms));
                now_ms
            }
        };
        out.push(NodeStatus {
            id,
            liveness,
            reason,
            since_ms,
            last_seen_ms: t.last_seen_ms,
            connected: session.is_some(),
            capacity: t.capacity,
            gossip,
            gossip_error,
            admin: None,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarting_agent_keeps_its_node_suspect_not_down() {
        use GossipSignal as G;
        use SessionSignal as S;
        for s in [S::Silent, S::Closed] {
            for g in [G::Dead, G::Absent] {
                let (l, why) = decide(s, g, false, true);
                assert_eq!(l, Liveness::Suspect, "{s:?} {g:?}");
                assert!(why.contains("restarting"));
                assert_eq!(decide(s, g, false, false).0, Liveness::Down);
            }
        }
        // A node that is back is up, whatever it said before.
        assert_eq!(decide(S::Fresh, G::Live, false, true).0, Liveness::Up);
    }

    #[test]
    fn both_signals_decide() {
        use GossipSignal as G;
        use SessionSignal as S;
        assert_eq!(decide(S::Fresh, G::Live, false, false).0, Liveness::Up);
        assert_eq!(
            decide(S::Never, G::Absent, true, false).0,
            Liveness::Suspect,
            "within the startup grace"
        );
        for (s, g) in [
            (S::Fresh, G::Dead),
            (S::Fresh, G::Absent),
            (S::Silent, G::Live),
            (S::Closed, G::Live),
            (S::Never, G::Live),
        ] {
            let (l, why) = decide(s, g, false, false);
            assert_eq!(l, Liveness::Suspect, "{s:?} {g:?}");
            assert!(!why.is_empty());
        }
        for s in [S::Silent, S::Closed, S::Never] {
            for g in [G::Dead, G::Absent] {
                assert_eq!(decide(s, g, false, false).0, Liveness::Down, "{s:?} {g:?}");
            }
        }
    }

    fn status(liveness: Liveness) -> NodeStatus {
        let mut gpus = gantry_shared::gossip::AgentGossip {
            addr: "10.0.0.1".parse().expect("ip"),
            labels: BTreeMap::new(),
            resources: Default::default(),
            free_gpus: vec![],
            gpus: vec![],
            images: Default::default(),
        };
        gpus.gpus = (0..2)
            .map(|index| gantry_shared::gossip::GpuInfo {
                index,
                uuid: format!("GPU-SIM-n-{index}"),
                model: "H100-80GB".into(),
                memory_bytes: 80 << 30,
                pci_bus_id: String::new(),
                numa_node: None,
                nvlink_group: None,
                health: if index == 1 {
                    gantry_shared::gossip::GpuHealth::Unhealthy(
                        gantry_shared::attempt::GpuFault::Xid(79),
                    )
                } else {
                    gantry_shared::gossip::GpuHealth::Healthy
                },
                simulated: true,
            })
            .collect();
        NodeStatus {
            id: NodeId::new("n").expect("id"),
            liveness,
            reason: "",
            since_ms: 0,
            last_seen_ms: None,
            connected: true,
            capacity: Some(NodeCapacity {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                gpus: 2,
                shared_volumes: false,
            }),
            gossip: Some(gpus),
            gossip_error: None,
            admin: None,
        }
    }

    #[test]
    fn only_ready_up_nodes_take_work_and_unhealthy_gpus_are_listed() {
        assert!(status(Liveness::Up).placeable());
        assert!(!status(Liveness::Suspect).placeable());
        let mut no_gossip = status(Liveness::Up);
        no_gossip.gossip = None;
        assert!(
            !no_gossip.placeable(),
            "a node that has not described itself"
        );
        assert_eq!(status(Liveness::Down).state(), "down");
        let mut preempting = status(Liveness::Up);
        preempting.admin = Some(AdminState {
            mode: AdminMode::Preempt,
            since_ms: 0,
            deadline_ms: Some(1),
        });
        assert_eq!(preempting.state(), "preempting");
        let mut drained = status(Liveness::Up);
        drained.admin = Some(AdminState {
            mode: AdminMode::Drain,
            since_ms: 0,
            deadline_ms: None,
        });
        assert_eq!(drained.state(), "draining");
        assert!(!drained.placeable());
        assert_eq!(status(Liveness::Up).unhealthy_gpus(), [1].into());
    }
}
