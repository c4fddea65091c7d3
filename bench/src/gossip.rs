//! `gantry-bench gossip`: cluster membership at several cluster sizes, all members in this
//! process on loopback (127.0.0.1, port 0), one tokio runtime.
//!
//! For each size N it starts a fresh cluster: an observer member named like the
//! coordinator (`@coordinator`) and N agent members seeded with the observer's address,
//! each publishing what a real agent with 8 simulated H100s publishes (built with the
//! agent's own `describe` and simulated-GPU spec). It then measures, at the observer:
//!
//! - **convergence**: from the start of the first member until the observer sees all N
//!   agents live with key-values that decode to exactly what each published (and, less
//!   precisely, until every member sees every other);
//! - **steady-state traffic and CPU**: gossip bytes sent and received per member, and
//!   this process's CPU, over a window with no changes;
//! - **the heartbeat interval the observer sees**, from which the expected detection time
//!   follows (chitchat's phi is elapsed time over the mean heartbeat interval);
//! - **change propagation**: a random agent republishes its free cpu; time until the
//!   observer's `members()` shows the new value;
//! - **failure detection**: a random agent is shut down abruptly (its gossip task ends
//!   and its socket closes, as after `kill -9`); time until the observer reports it not
//!   live. It is then restarted with the next generation, as an agent restart would.
//!
//! Everything is bounded: waits have deadlines and each phase of trials has a time
//! budget. On a small machine the members compete for CPU and a starved member looks
//! dead, so CPU use and false deaths (a running member reported not live) are reported
//! next to the numbers.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use gantry_agent::gossip::{GossipSettings, describe};
use gantry_agent::gpu::simulated::parse_spec;
use gantry_membership::{GossipKey, Member, MemberView, MembershipConfig, Traffic};
use gantry_shared::gossip::{AgentGossip, KEY_RESOURCES, LocalImages, coordinator_key_values};
use gantry_shared::protocol::NodeCapacity;

use crate::percentile;

const CLUSTER: &str = "gantry-bench-gossip";
/// Every member seals its datagrams with it, as in a real cluster (the bytes measured
/// include the stamp and tag).
const KEY: GossipKey = GossipKey::from_bytes([0x5a; 32]);
/// The coordinator's member name (`gantry_coordinator::nodes::liveness::COORDINATOR_MEMBER`).
const OBSERVER: &str = "@coordinator";
/// What each agent declares: a typical 8-GPU node.
const GPU_SPEC: &str = "8xH100-80GB,nvlink=8,numa=2";
/// How often the observer is polled while a change or a death is awaited.
const POLL: Duration = Duration::from_millis(5);
/// How often the observer is polled while its heartbeat updates are counted.
const HEARTBEAT_POLL: Duration = Duration::from_millis(2);
/// How often the observer is polled during convergence (it decodes every new member).
const CONVERGE_POLL: Duration = Duration::from_millis(10);
/// How often every member is asked whether it sees every other (costly at 200 members).
const ALL_SEE_ALL_POLL: Duration = Duration::from_millis(250);
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
const CHANGE_LIMIT: Duration = Duration::from_secs(10);
const DETECT_LIMIT: Duration = Duration::from_secs(30);
const REJOIN_LIMIT: Duration = Duration::from_secs(15);
/// Window over which the observer's heartbeat arrivals are counted.
const HEARTBEAT_WINDOW: Duration = Duration::from_secs(3);
/// Largest cluster size accepted (one UDP socket and one task per member).
pub const MAX_MEMBERS: usize = 1_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct GossipBench {
    /// Cluster sizes (agents; the observer comes on top).
    pub members: Vec<usize>,
    /// Change and detection trials per size.
    pub trials: usize,
    /// Gossip interval and phi threshold of every member.
    pub membership: MembershipConfig,
    /// Steady-state window for bytes and CPU.
    pub window: Duration,
    /// Pause after a restarted member is visible again, before the next detection trial.
    pub settle: Duration,
    /// Longest each phase of trials runs per size; fewer trials are reported if reached.
    pub phase_budget: Duration,
    /// Seeds the choice of members and values; printed so a run can be replayed.
    pub seed: u64,
}

/// One cluster size's results.
#[derive(Debug, Default)]
struct Row {
    members: usize,
    /// Seconds until the observer saw all agents live and decodable.
    convergence: Option<f64>,
    /// How many it saw (all of them, unless the limit passed first).
    converged: usize,
    all_see_all: Option<f64>,
    change: Trials,
    detection: Trials,
    /// Restart of a killed agent (next generation) until the observer sees it live.
    rejoin: Vec<f64>,
    /// Bytes/s per agent, and of the observer.
    agent_sent: f64,
    agent_received: f64,
    observer_sent: f64,
    observer_received: f64,
    /// Cores this process used in the steady window, and during the trials.
    cpu_steady: f64,
    cpu_trials: f64,
    /// Mean interval between heartbeat updates the observer got for an agent (ms).
    heartbeat_ms: Option<f64>,
    /// Times a running agent was seen not live by the observer.
    false_deaths: usize,
    /// UDP datagrams dropped for a full receive buffer, of all that arrived, in the
    /// steady window and over the whole size.
    drops_steady: Option<UdpDrops>,
    drops_all: Option<UdpDrops>,
}

/// The network namespace's UDP counters (`/proc/net/snmp`): they count every process in
/// it, not only this one.
#[derive(Debug, Clone, Copy)]
struct UdpDrops {
    received: u64,
    dropped: u64,
}

impl UdpDrops {
    fn now() -> Option<Self> {
        let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
        let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
        let names: Vec<&str> = udp.next()?.split_whitespace().collect();
        let values: Vec<&str> = udp.next()?.split_whitespace().collect();
        let get = |name: &str| -> Option<u64> {
            let i = names.iter().position(|n| *n == name)?;
            values.get(i)?.parse().ok()
        };
        Some(Self {
            received: get("InDatagrams")?,
            dropped: get("RcvbufErrors")?,
        })
    }

    fn since(self, start: Option<Self>) -> Option<Self> {
        let start = start?;
        Some(Self {
            received: self.received.saturating_sub(start.received),
            dropped: self.dropped.saturating_sub(start.dropped),
        })
    }

    fn percent(&self) -> f64 {
        100.0 * self.dropped as f64 / (self.received + self.dropped).max(1) as f64
    }
}

fn drops_since(start: Option<UdpDrops>) -> Option<UdpDrops> {
    UdpDrops::now()?.since(start)
}

#[derive(Debug, Default)]
struct Trials {
    ms: Vec<f64>,
    timed_out: usize,
    /// Trials skipped because the phase budget ran out.
    skipped: usize,
}

struct Agent {
    name: String,
    generation: u64,
    gossip: AgentGossip,
    member: Member,
}

impl Agent {
    fn key(&self) -> (String, u64) {
        (self.name.clone(), self.generation)
    }
}

/// SplitMix64: enough randomness to pick members, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// CPU time of this process (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return f64::NAN;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Cores used between `start` and now.
struct CpuMeter {
    wall: Instant,
    cpu: f64,
}

impl CpuMeter {
    fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: cpu_seconds(),
        }
    }

    fn cores(&self) -> f64 {
        (cpu_seconds() - self.cpu) / self.wall.elapsed().as_secs_f64().max(1e-9)
    }
}

/// Counts running agents the observer reports not live after having seen them live
/// (each transition once; a member that just started is not live until its second
/// heartbeat, which is not counted).
#[derive(Default)]
struct FalseDeaths {
    seen_live: HashSet<(String, u64)>,
    suspected: HashSet<(String, u64)>,
    count: usize,
}

impl FalseDeaths {
    fn observe(&mut self, view: &[MemberView], running: &HashSet<(String, u64)>) {
        for v in view {
            let key = (v.node.clone(), v.generation);
            if !running.contains(&key) {
                continue;
            }
            if v.live {
                self.suspected.remove(&key);
                self.seen_live.insert(key);
            } else if self.seen_live.contains(&key) && self.suspected.insert(key) {
                self.count += 1;
            }
        }
    }
}

fn member_config(base: &MembershipConfig, seeds: Vec<String>) -> MembershipConfig {
    MembershipConfig {
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        advertise: None,
        seeds,
        ..base.clone()
    }
}

/// What agent `i` publishes at start: the agent's own description of an idle node with
/// 8 simulated GPUs.
fn agent_gossip(
    name: &str,
    i: usize,
    membership: &MembershipConfig,
) -> anyhow::Result<AgentGossip> {
    let gpus = parse_spec(GPU_SPEC, name).context("simulated GPU spec")?;
    let settings = GossipSettings {
        membership: membership.clone(),
        labels: [("rack".to_owned(), format!("r{:02}", i % 16))].into(),
        addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
        refresh: Duration::from_secs(10),
        capacity: NodeCapacity {
            cpu_millis: 192_000,
            memory_bytes: 2 << 40,
            gpus: gpus.len() as u32,
            shared_volumes: false,
        },
    };
    // An operator's one imported image, as a typical node has.
    let images = LocalImages::from_stored(["busybox:latest".to_owned()]);
    Ok(describe(&settings, &gpus, &[], images))
}

async fn start_agent(i: usize, generation: u64, cfg: &MembershipConfig) -> anyhow::Result<Agent> {
    let name = format!("bench-node-{i:03}");
    let gossip = agent_gossip(&name, i, cfg)?;
    let member = Member::start(
        &name,
        generation,
        CLUSTER,
        &KEY,
        cfg,
        gossip.to_key_values(),
    )
    .await
    .with_context(|| format!("starting member {name}"))?;
    Ok(Agent {
        name,
        generation,
        gossip,
        member,
    })
}

/// Whether `v` is live and carries exactly what `a` published.
fn complete(v: &MemberView, a: &Agent) -> bool {
    v.live
        && AgentGossip::decode(|k| v.key_values.get(k).map(String::as_str))
            .is_ok_and(|g| g == a.gossip)
}

fn sum_traffic(t: &[Arc<Traffic>]) -> (u64, u64) {
    t.iter().fold((0, 0), |(s, r), t| {
        (
            s + t.sent.load(Ordering::Relaxed),
            r + t.received.load(Ordering::Relaxed),
        )
    })
}

/// A fresh cluster of `n` agents and the observer.
struct Cluster {
    observer: Member,
    agents: Vec<Agent>,
    cfg: MembershipConfig,
}

impl Cluster {
    fn running(&self) -> HashSet<(String, u64)> {
        self.agents.iter().map(Agent::key).collect()
    }

    async fn shutdown(self) {
        for a in self.agents {
            a.member.shutdown().await;
        }
        self.observer.shutdown().await;
    }
}

/// Starts the cluster and waits for convergence; fills `row.convergence` and
/// `row.all_see_all`.
async fn converge(bench: &GossipBench, n: usize, row: &mut Row) -> anyhow::Result<Cluster> {
    let t0 = Instant::now();
    let observer = Member::start(
        OBSERVER,
        1,
        CLUSTER,
        &KEY,
        &member_config(&bench.membership, Vec::new()),
        coordinator_key_values("127.0.0.1:7443", "127.0.0.1:8080"),
    )
    .await
    .context("starting the observer")?;
    let cfg = member_config(&bench.membership, vec![observer.gossip_addr().to_string()]);
    // Agents start spread over one gossip interval, so their rounds are not in lockstep
    // (real agents start at unrelated times).
    let spread = bench.membership.gossip_interval;
    let mut agents = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until((t0 + spread.mul_f64(i as f64 / n as f64)).into()).await;
        agents.push(start_agent(i, 1, &cfg).await?);
    }
    let by_key: HashMap<(String, u64), &Agent> = agents.iter().map(|a| (a.key(), a)).collect();
    let mut seen: HashSet<(String, u64)> = HashSet::new();
    while t0.elapsed() < CONVERGE_LIMIT {
        for v in observer.members().await {
            let key = (v.node.clone(), v.generation);
            if !seen.contains(&key) && by_key.get(&key).is_some_and(|a| complete(&v, a)) {
                seen.insert(key);
            }
        }
        if seen.len() == n {
            row.convergence = Some(t0.elapsed().as_secs_f64());
        }
        row.converged = seen.len();
        if row.convergence.is_some() {
            break;
        }
        tokio::time::sleep(CONVERGE_POLL).await;
    }
    // Every member sees every other live with all its keys.
    let keys: HashMap<(String, u64), usize> = agents
        .iter()
        .map(|a| (a.key(), a.gossip.to_key_values().len()))
        .collect();
    let mut done = vec![false; n];
    while t0.elapsed() < CONVERGE_LIMIT {
        for (i, a) in agents.iter().enumerate() {
            if done[i] {
                continue;
            }
            let view = a.member.members().await;
            done[i] = view.iter().filter(|v| v.live).count() == n + 1
                && view.iter().all(|v| {
                    keys.get(&(v.node.clone(), v.generation))
                        .is_none_or(|&k| v.key_values.len() >= k)
                });
        }
        if done.iter().all(|d| *d) {
            row.all_see_all = Some(t0.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(ALL_SEE_ALL_POLL).await;
    }
    Ok(Cluster {
        observer,
        agents,
        cfg,
    })
}

/// Bytes and CPU over the steady window, then the heartbeat interval the observer sees.
async fn steady(bench: &GossipBench, c: &Cluster, row: &mut Row, flaps: &mut FalseDeaths) {
    let n = c.agents.len();
    let agents: Vec<Arc<Traffic>> = c.agents.iter().map(|a| a.member.traffic()).collect();
    let observer = [c.observer.traffic()];
    let (a0, o0, cpu) = (
        sum_traffic(&agents),
        sum_traffic(&observer),
        CpuMeter::start(),
    );
    let udp = UdpDrops::now();
    tokio::time::sleep(bench.window).await;
    let (a1, o1) = (sum_traffic(&agents), sum_traffic(&observer));
    row.drops_steady = drops_since(udp);
    let secs = cpu.wall.elapsed().as_secs_f64();
    row.cpu_steady = cpu.cores();
    row.agent_sent = a1.0.saturating_sub(a0.0) as f64 / secs / n as f64;
    row.agent_received = a1.1.saturating_sub(a0.1) as f64 / secs / n as f64;
    row.observer_sent = o1.0.saturating_sub(o0.0) as f64 / secs;
    row.observer_received = o1.1.saturating_sub(o0.1) as f64 / secs;

    // Heartbeat updates the observer takes in: each one is a sample of chitchat's
    // failure detector for that member.
    let running = c.running();
    let mut last: HashMap<(String, u64), u64> = HashMap::new();
    let mut updates = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < HEARTBEAT_WINDOW {
        let view = c.observer.members().await;
        flaps.observe(&view, &running);
        for v in view {
            let key = (v.node, v.generation);
            if !running.contains(&key) {
                continue;
            }
            if let Some(prev) = last.insert(key, v.heartbeat)
                && v.heartbeat > prev
            {
                updates += 1;
            }
        }
        tokio::time::sleep(HEARTBEAT_POLL).await;
    }
    if updates > 0 {
        row.heartbeat_ms = Some(t0.elapsed().as_secs_f64() * 1e3 * n as f64 / updates as f64);
    }
}

/// Polls the observer until `done` holds for the view, for at most `limit`; returns the
/// milliseconds since `t0`.
async fn await_observer(
    c: &Cluster,
    t0: Instant,
    limit: Duration,
    flaps: &mut FalseDeaths,
    running: &HashSet<(String, u64)>,
    done: impl Fn(&[MemberView]) -> bool,
) -> Option<f64> {
    while t0.elapsed() < limit {
        let view = c.observer.members().await;
        if done(&view) {
            return Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        flaps.observe(&view, running);
        tokio::time::sleep(POLL).await;
    }
    None
}

/// A random agent republishes with another free cpu; time until the observer shows it.
async fn changes(
    bench: &GossipBench,
    c: &mut Cluster,
    rng: &mut Rng,
    row: &mut Row,
    flaps: &mut FalseDeaths,
) {
    let phase = Instant::now();
    let running = c.running();
    for trial in 0..bench.trials {
        if phase.elapsed() >= bench.phase_budget {
            row.change.skipped = bench.trials - trial;
            break;
        }
        // Out of phase with the gossip rounds.
        tokio::time::sleep(Duration::from_millis(50 + rng.below(250) as u64)).await;
        let i = rng.below(c.agents.len());
        let a = &mut c.agents[i];
        let res = &mut a.gossip.resources;
        res.free_cpu_millis =
            (res.free_cpu_millis + 1 + rng.below(1_000) as u64) % res.cpu_millis.max(1);
        let kv = a.gossip.to_key_values();
        let want = kv
            .iter()
            .find(|(k, _)| k == KEY_RESOURCES)
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let key = a.key();
        let t0 = Instant::now();
        a.member.set(kv).await;
        let seen = await_observer(c, t0, CHANGE_LIMIT, flaps, &running, |view| {
            view.iter().any(|v| {
                v.node == key.0
                    && v.generation == key.1
                    && v.key_values.get(KEY_RESOURCES) == Some(&want)
            })
        })
        .await;
        match seen {
            Some(ms) => row.change.ms.push(ms),
            None => row.change.timed_out += 1,
        }
    }
}

/// A random agent stops abruptly; time until the observer reports it not live. It is then
/// restarted with the next generation.
async fn detections(
    bench: &GossipBench,
    c: &mut Cluster,
    rng: &mut Rng,
    row: &mut Row,
    flaps: &mut FalseDeaths,
) -> anyhow::Result<()> {
    let phase = Instant::now();
    for trial in 0..bench.trials {
        if phase.elapsed() >= bench.phase_budget {
            row.detection.skipped = bench.trials - trial;
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(250) as u64)).await;
        let victim = c.agents.swap_remove(rng.below(c.agents.len()));
        let (name, generation) = victim.key();
        let running = c.running();
        let t0 = Instant::now();
        victim.member.shutdown().await;
        let seen = await_observer(c, t0, DETECT_LIMIT, flaps, &running, |view| {
            view.iter()
                .any(|v| v.node == name && v.generation == generation && !v.live)
        })
        .await;
        match seen {
            Some(ms) => row.detection.ms.push(ms),
            None => row.detection.timed_out += 1,
        }
        // The agent comes back, as after a restart: same node, next generation.
        let index = name
            .rsplit('-')
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let t1 = Instant::now();
        let back = start_agent(index, generation + 1, &c.cfg).await?;
        let back_key = back.key();
        let back_gossip = back.gossip.clone();
        c.agents.push(back);
        let running = c.running();
        let rejoined = await_observer(c, t1, REJOIN_LIMIT, flaps, &running, |view| {
            view.iter().any(|v| {
                v.node == back_key.0
                    && v.generation == back_key.1
                    && v.live
                    && AgentGossip::decode(|k| v.key_values.get(k).map(String::as_str))
                        .is_ok_and(|g| g == back_gossip)
            })
        })
        .await;
        if let Some(ms) = rejoined {
            row.rejoin.push(ms);
        }
        tokio::time::sleep(bench.settle).await;
    }
    Ok(())
}

async fn measure(bench: &GossipBench, n: usize, rng: &mut Rng) -> anyhow::Result<Row> {
    let mut row = Row {
        members: n,
        ..Row::default()
    };
    let mut flaps = FalseDeaths::default();
    let udp = UdpDrops::now();
    eprintln!("gossip: {n} members: starting");
    let mut c = converge(bench, n, &mut row).await?;
    eprintln!(
        "gossip: {n} members: converged {:?}, all see all {:?}",
        row.convergence, row.all_see_all
    );
    // Let the last deltas settle before the steady window.
    tokio::time::sleep(Duration::from_secs(1)).await;
    steady(bench, &c, &mut row, &mut flaps).await;
    eprintln!("gossip: {n} members: steady window done; changes");
    let cpu = CpuMeter::start();
    changes(bench, &mut c, rng, &mut row, &mut flaps).await;
    eprintln!("gossip: {n} members: detections");
    let result = detections(bench, &mut c, rng, &mut row, &mut flaps).await;
    row.cpu_trials = cpu.cores();
    row.false_deaths = flaps.count;
    row.drops_all = drops_since(udp);
    c.shutdown().await;
    result?;
    Ok(row)
}

pub async fn run(bench: GossipBench) -> anyhow::Result<()> {
    let mut rng = Rng(bench.seed);
    let mut rows = Vec::new();
    for &n in &bench.members {
        rows.push(measure(&bench, n, &mut rng).await?);
    }
    print_table(&bench, &rows);
    Ok(())
}

fn p50_p99(t: &Trials) -> String {
    match (percentile(&t.ms, 50.0), percentile(&t.ms, 99.0)) {
        (Some(p50), Some(p99)) => {
            let mut s = format!("{p50:.0} / {p99:.0} ms");
            if t.timed_out > 0 {
                s.push_str(&format!(" ({} timed out)", t.timed_out));
            }
            s
        }
        _ => format!("— ({} timed out)", t.timed_out),
    }
}

fn print_table(bench: &GossipBench, rows: &[Row]) {
    let interval_ms = bench.membership.gossip_interval.as_secs_f64() * 1e3;
    let phi = bench.membership.phi_threshold;
    println!(
        "| members | convergence (observer / all see all) | change visible p50 / p99 | detection p50 / p99 | sent KB/s/node | received KB/s/node | CPU steady / trials (cores of {}) | false deaths | UDP drops steady / whole |",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let drops =
        |d: Option<UdpDrops>| d.map_or_else(|| "—".to_owned(), |d| format!("{:.2} %", d.percent()));
    for r in rows {
        let convergence = match r.convergence {
            Some(s) => format!("{s:.2} s"),
            None => format!(
                "not in {} s ({}/{})",
                CONVERGE_LIMIT.as_secs(),
                r.converged,
                r.members
            ),
        };
        let all = r
            .all_see_all
            .map_or_else(|| "—".to_owned(), |s| format!("{s:.2} s"));
        println!(
            "| {} | {convergence} / {all} | {} | {} | {:.1} | {:.1} | {:.2} / {:.2} | {} | {} / {} |",
            r.members,
            p50_p99(&r.change),
            p50_p99(&r.detection),
            r.agent_sent / 1e3,
            r.agent_received / 1e3,
            r.cpu_steady,
            r.cpu_trials,
            r.false_deaths,
            drops(r.drops_steady),
            drops(r.drops_all),
        );
    }
    println!();
    println!(
        "gossip every {interval_ms:.0} ms, phi threshold {phi}, {} change and {} detection trials per size (seed {}); bytes over a {} s steady window, per agent; the observer polled every {} ms; UDP drops: datagrams refused for a full receive buffer, of all that arrived in this network namespace.",
        bench.trials,
        bench.trials,
        bench.seed,
        bench.window.as_secs_f64(),
        POLL.as_millis()
    );
    println!();
    for r in rows {
        let hb = r.heartbeat_ms.map_or_else(
            || "no heartbeat interval measured".to_owned(),
            |m| {
                format!(
                    "the observer took a heartbeat update per agent every {m:.0} ms (polled every {} ms, so at most the failure detector's mean interval), so expected detection ≈ phi × {m:.0} ms + up to one round = {:.0}–{:.0} ms",
                    HEARTBEAT_POLL.as_millis(),
                    phi * m,
                    phi * m + interval_ms
                )
            },
        );
        let skipped = r.change.skipped + r.detection.skipped;
        println!(
            "- {} members: {hb}; restart visible again p50 {}; observer sent {:.1} KB/s, received {:.1} KB/s; trials done: {} changes, {} detections{}.",
            r.members,
            percentile(&r.rejoin, 50.0).map_or_else(|| "—".to_owned(), |m| format!("{m:.0} ms")),
            r.observer_sent / 1e3,
            r.observer_received / 1e3,
            r.change.ms.len() + r.change.timed_out,
            r.detection.ms.len() + r.detection.timed_out,
            if skipped > 0 {
                format!(
                    " ({skipped} skipped: phase budget {} s)",
                    bench.phase_budget.as_secs()
                )
            } else {
                String::new()
            }
        );
    }
}
