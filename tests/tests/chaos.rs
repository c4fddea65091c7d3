//! The chaos suite: five test hosts with simulated GPUs run a few hundred short jobs
//! (single-node CPU and GPU jobs, two-node gangs, jobs that fail once and then succeed, and
//! jobs that fail by their own exit code), while a seeded random schedule of faults hits the
//! cluster: kill -9 of a host, of only its agent, of the coordinator; partition and heal;
//! pause and resume; a spot preemption; an injected Xid on a GPU.
//!
//! Checked while it runs (every host's processes are sampled a few times a second):
//! - no GPU of a host is held by two attempts at once;
//! - no job has two generations alive at once, except while the older one sits on a host
//!   that is cut off, paused, without its agent, or back for less than [`SETTLE`] (the
//!   fence has not reached it yet), or within [`SETTLE`] of a coordinator restart.
//!
//! Beside the jobs, each round calls a deployed function (the example echo runtime) with a
//! few inputs that echo, sleep or fail by their own error, so calls are in flight during
//! every kind of fault.
//!
//! Checked at the end: every accepted job ended, and as it should (succeeded, or failed only
//! by its own exit code after its retries); every accepted function input ended with exactly
//! one outcome, the right one (its echo, or its own error; a platform failure only after the
//! platform failed it more than its retries allow, which is reported); no container
//! process, mount or cgroup is left (idle function containers drain).
//!
//! The seed is printed; `GANTRY_CHAOS_SEED=N` replays a run's fault schedule and jobs (the
//! timing of a real cluster still varies). `GANTRY_CHAOS_ROUNDS=N` runs more rounds (20 jobs
//! and one fault each; the default is 15). A long run:
//! `GANTRY_CHAOS_ROUNDS=200 cargo nextest run -p gantry-tests --test chaos --no-capture`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_tests::cluster::{ClusterSpec, TestCluster};
use gantry_tests::netns::{Host, wait_until};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

const HOSTS: usize = 5;
const GPUS: &str = "4xH100-80GB,nvlink=2";
const JOBS_PER_ROUND: usize = 20;
/// Inputs of the function call each round makes.
const INPUTS_PER_ROUND: usize = 6;
/// The function the rounds call.
const MANIFEST: &str = r#"
app = "chaos"
[functions.work]
image = "echo"
command = ["/app/runtime"]
cpu = "0.1"
memory = "32M"
max_containers = 6
max_inputs = 2
scaledown_window = "3s"
"#;
const DEFAULT_ROUNDS: usize = 15;
/// How long after a host is reachable again (or the coordinator is back) an older
/// generation may still run there: the node reconnects, the coordinator sends the fence,
/// the container is killed.
const SETTLE: Duration = Duration::from_secs(8);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Cpu,
    Gpu,
    Gang,
    /// Exits 3 on its first generation, succeeds after (one retry).
    Flaky,
    /// Always exits 7; one retry; must end failed with 7.
    Failing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillHost,
    KillAgent,
    KillCoordinator,
    Partition,
    Pause,
    Preempt,
    Xid,
}

const FAULTS: [Fault; 7] = [
    Fault::KillHost,
    Fault::KillAgent,
    Fault::KillCoordinator,
    Fault::Partition,
    Fault::Pause,
    Fault::Preempt,
    Fault::Xid,
];

/// Where faults stand, for the sampler: a host is unsettled while faulted and for
/// [`SETTLE`] after; the whole cluster for [`SETTLE`] after a coordinator restart.
#[derive(Default)]
struct Unsettled {
    hosts: BTreeMap<usize, Option<Instant>>,
    cluster_until: Option<Instant>,
}

impl Unsettled {
    fn faulted(&mut self, host: usize) {
        self.hosts.insert(host, None);
    }

    fn restored(&mut self, host: usize) {
        self.hosts.insert(host, Some(Instant::now() + SETTLE));
    }

    fn is_unsettled(&self, host: usize, now: Instant) -> bool {
        self.cluster_until.is_some_and(|t| now < t)
            || self
                .hosts
                .get(&host)
                .is_some_and(|until| until.is_none_or(|t| now < t))
    }
}

/// An attempt's container seen alive on a host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    job: String,
    generation: u64,
    gpus: BTreeSet<u32>,
}

/// The attempts alive on `host`, from its processes' environments.
fn alive(host: &Host) -> Vec<Seen> {
    let mut by_attempt: BTreeMap<(String, u64), BTreeSet<u32>> = BTreeMap::new();
    for pid in host.pids() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue; // gone meanwhile
        };
        let mut job = None;
        let mut generation = None;
        let mut gpus = BTreeSet::new();
        for var in env.split(|b| *b == 0) {
            let var = String::from_utf8_lossy(var);
            if let Some(v) = var.strip_prefix("GANTRY_JOB_ID=") {
                job = Some(v.to_owned());
            } else if let Some(v) = var.strip_prefix("GANTRY_ATTEMPT=") {
                generation = v.parse().ok();
            } else if let Some(v) = var.strip_prefix("NVIDIA_VISIBLE_DEVICES=") {
                gpus.extend(v.split(',').filter_map(|g| g.parse::<u32>().ok()));
            }
        }
        if let (Some(job), Some(generation)) = (job, generation) {
            by_attempt
                .entry((job, generation))
                .or_default()
                .extend(gpus);
        }
    }
    by_attempt
        .into_iter()
        .map(|((job, generation), gpus)| Seen {
            job,
            generation,
            gpus,
        })
        .collect()
}

/// The function containers alive on `host` (their `GANTRY_CONTAINER`).
fn function_containers(host: &Host) -> BTreeSet<String> {
    host.pids()
        .into_iter()
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/environ")).ok())
        .filter_map(|env| {
            env.split(|b| *b == 0).find_map(|var| {
                String::from_utf8_lossy(var)
                    .strip_prefix("GANTRY_CONTAINER=")
                    .map(str::to_owned)
            })
        })
        .collect()
}

/// One look at every host: violations of the two invariants that hold at every instant.
/// Returns the attempts it saw (job, generation).
fn check_sample(
    hosts: &[Host],
    unsettled: &Unsettled,
    violations: &mut BTreeSet<String>,
) -> Vec<(String, u64)> {
    let now = Instant::now();
    let mut generations: BTreeMap<String, BTreeMap<u64, Vec<usize>>> = BTreeMap::new();
    for (i, host) in hosts.iter().enumerate() {
        let seen = alive(host);
        let mut holders: BTreeMap<u32, Vec<&Seen>> = BTreeMap::new();
        for s in &seen {
            for g in &s.gpus {
                holders.entry(*g).or_default().push(s);
            }
            generations
                .entry(s.job.clone())
                .or_default()
                .entry(s.generation)
                .or_default()
                .push(i);
        }
        for (gpu, who) in holders.iter().filter(|(_, w)| w.len() > 1) {
            let who: Vec<String> = who
                .iter()
                .map(|s| format!("{} generation {}", s.job, s.generation))
                .collect();
            violations.insert(format!(
                "GPU {gpu} of {} held by {} at once",
                host.name(),
                who.join(" and ")
            ));
        }
    }
    for (job, gens) in generations.iter().filter(|(_, g)| g.len() > 1) {
        let newest = gens.keys().max().copied().unwrap_or(0);
        for (g, on) in gens.iter().filter(|(g, _)| **g < newest) {
            for &i in on.iter().filter(|&&i| !unsettled.is_unsettled(i, now)) {
                violations.insert(format!(
                    "{job}: generation {g} still alive on {} (settled) while generation {newest} runs",
                    hosts[i].name()
                ));
            }
        }
    }
    generations
        .into_iter()
        .flat_map(|(job, gens)| gens.into_keys().map(move |g| (job.clone(), g)))
        .collect()
}

fn job_spec(kind: Kind, rng: &mut StdRng) -> Value {
    let secs = format!("{:.1}", rng.random_range(0.2..3.0));
    let resources = |gpus: u32| json!({"cpu": "0.25", "memory": "32M", "gpus": gpus});
    let backoff = json!({"initial": "100ms", "factor": 2, "max": "1s"});
    match kind {
        Kind::Cpu => json!({
            "name": "cpu", "image": "busybox", "command": ["sleep", secs],
            "resources": resources(0),
        }),
        Kind::Gpu => json!({
            "name": "gpu", "image": "busybox", "command": ["sleep", secs],
            "resources": resources(rng.random_range(1..=2)),
        }),
        Kind::Gang => json!({
            "name": "gang", "image": "busybox", "command": ["sleep", secs],
            "nodes": 2, "resources": resources(1),
        }),
        Kind::Flaky => json!({
            "name": "flaky", "image": "busybox",
            "command": ["sh", "-c", format!("[ \"$GANTRY_ATTEMPT\" -ge 2 ] || exit 3; sleep {secs}")],
            "resources": resources(0), "retries": 1, "backoff": backoff,
        }),
        Kind::Failing => json!({
            "name": "failing", "image": "busybox",
            "command": ["sh", "-c", format!("sleep {secs}; exit 7")],
            "resources": resources(0), "retries": 1, "backoff": backoff,
        }),
    }
}

fn random_kind(rng: &mut StdRng) -> Kind {
    match rng.random_range(0..20) {
        0..=6 => Kind::Cpu,
        7..=11 => Kind::Gpu,
        12..=14 => Kind::Gang,
        15..=17 => Kind::Flaky,
        _ => Kind::Failing,
    }
}

/// Why `job` did not end as a job of `kind` must, if it did not.
fn wrong_ending(kind: Kind, job: &Value) -> Option<String> {
    let state = job["state"].as_str().unwrap_or("?");
    let attempts = job["attempts"].as_array().cloned().unwrap_or_default();
    let newest = attempts
        .iter()
        .filter_map(|a| a["generation"].as_u64())
        .max()
        .unwrap_or(0);
    let last_codes: Vec<i64> = attempts
        .iter()
        .filter(|a| a["generation"].as_u64() == Some(newest))
        .filter_map(|a| a["exit_code"].as_i64())
        .collect();
    let ok = match kind {
        Kind::Failing => state == "failed" && job["failures"] == 2 && last_codes.contains(&7),
        _ => state == "succeeded",
    };
    (!ok).then(|| {
        format!(
            "{} ({kind:?}) ended {state}: {}; attempts: {}",
            job["id"], job["reason"], job["attempts"]
        )
    })
}

/// Mounts below `dir` (from this process's mount table: the hosts share it).
fn mounts_below(dir: &std::path::Path) -> Vec<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| std::path::Path::new(m).starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

/// Container cgroups left below an agent's cgroup parent, in every hierarchy.
fn cgroups_below(parent: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(roots) = std::fs::read_dir("/sys/fs/cgroup") else {
        return out;
    };
    let mut dirs: Vec<std::path::PathBuf> = roots.flatten().map(|e| e.path()).collect();
    dirs.push("/sys/fs/cgroup".into());
    for root in dirs {
        if let Ok(children) = std::fs::read_dir(root.join(parent)) {
            out.extend(
                children
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path().display().to_string()),
            );
        }
    }
    out
}

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a whole number")),
    )
}

struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

struct Chaos {
    c: TestCluster,
    rng: StdRng,
    unsettled: Arc<Mutex<Unsettled>>,
    jobs: Vec<(String, Kind)>,
    /// Function calls made, each with its inputs' texts.
    calls: Vec<(String, Vec<String>)>,
    faults: BTreeMap<Fault, usize>,
}

impl Chaos {
    fn lock(&self) -> std::sync::MutexGuard<'_, Unsettled> {
        self.unsettled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn submit_round(&mut self) {
        for _ in 0..JOBS_PER_ROUND {
            let kind = random_kind(&mut self.rng);
            let spec = job_spec(kind, &mut self.rng);
            let job = self.c.submit(spec);
            self.jobs
                .push((job["id"].as_str().expect("id").to_owned(), kind));
        }
    }

    /// One call of the function with inputs that echo, sleep or fail. The coordinator may
    /// be restarting: the call is retried with the same Idempotency-Key until accepted.
    fn call_round(&mut self, round: usize) {
        let texts: Vec<String> = (0..INPUTS_PER_ROUND)
            .map(|i| match self.rng.random_range(0..4) {
                0 => format!("sleep:{}", self.rng.random_range(100..1500)),
                1 => format!("fail:round {round} input {i}"),
                _ => format!("echo {round}/{i}"),
            })
            .collect();
        let body = json!({
            "inputs": texts.iter().map(|t| json!({"text": t})).collect::<Vec<_>>(),
            "wait": false,
        });
        let key = format!("chaos-call-{round}");
        let id = wait_until("the call accepted", Duration::from_secs(60), || {
            let r = self
                .c
                .http()
                .post(format!(
                    "http://{}/v1/apps/chaos/functions/work/calls",
                    self.c.api
                ))
                .bearer_auth(&self.c.admin)
                .header("idempotency-key", &key)
                .json(&body)
                .send()
                .ok()?;
            if !r.status().is_success() {
                return None;
            }
            let v: Value = r.json().ok()?;
            v["id"].as_str().map(str::to_owned)
        });
        self.calls.push((id, texts));
    }

    fn pause_for(&mut self, min: f64, max: f64) {
        std::thread::sleep(Duration::from_secs_f64(self.rng.random_range(min..max)));
    }

    fn gantry_ok(&self, args: &[&str]) {
        let out = self.c.gantry(args);
        assert!(
            out.status.success(),
            "gantry {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// One fault on a random host (or the coordinator), held for a while, then undone.
    fn fault(&mut self, fault: Fault) {
        let i = self.rng.random_range(0..HOSTS);
        let node = self.c.agents[i].node.clone();
        eprintln!("chaos: {fault:?} on {node}");
        *self.faults.entry(fault).or_default() += 1;
        match fault {
            Fault::KillHost | Fault::KillAgent => {
                self.lock().faulted(i);
                if fault == Fault::KillHost {
                    self.c.kill_host(i);
                } else {
                    self.c.kill_agent(i);
                }
                self.pause_for(0.5, 3.0);
                self.c.start_agent(i);
                self.lock().restored(i);
            }
            Fault::KillCoordinator => {
                self.lock().cluster_until = Some(Instant::now() + Duration::from_secs(3600));
                self.c.coordinator.kill9();
                self.pause_for(0.5, 2.0);
                self.c.restart_coordinator();
                self.lock().cluster_until = Some(Instant::now() + SETTLE);
            }
            Fault::Partition => {
                self.lock().faulted(i);
                self.c.agents[i].host.partition();
                self.pause_for(0.5, 4.0);
                self.c.agents[i].host.heal();
                self.lock().restored(i);
            }
            Fault::Pause => {
                self.lock().faulted(i);
                self.c.agents[i].host.pause();
                self.pause_for(0.5, 4.0);
                self.c.agents[i].host.resume();
                self.lock().restored(i);
            }
            Fault::Preempt => {
                // A spot interruption with two minutes' notice shortened to two seconds;
                // then the instance goes away and a replacement joins under its name.
                self.gantry_ok(&["nodes", "preempt", &node, "--deadline", "2s"]);
                std::thread::sleep(Duration::from_secs(3));
                self.lock().faulted(i);
                self.c.kill_host(i);
                self.c.start_agent(i);
                self.lock().restored(i);
                self.gantry_ok(&["nodes", "undrain", &node]);
            }
            Fault::Xid => {
                let gpu = self.rng.random_range(0..4).to_string();
                self.c.inject_xid(i, &gpu, "79");
                self.pause_for(1.0, 3.0);
                // The node may be reconnecting (after a coordinator restart): the API says
                // so (503), and an operator tries again.
                wait_until("the GPU cleared", Duration::from_secs(30), || {
                    let out = self.c.gantry(&["nodes", "gpu-clear", &node, "--gpu", &gpu]);
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    assert!(
                        out.status.success() || stderr.contains("not connected"),
                        "gpu-clear: {stderr}"
                    );
                    out.status.success().then_some(())
                });
            }
        }
    }

    /// Waits until every node is ready again (a fault's effects are over).
    fn wait_ready(&self) {
        let names: Vec<String> = self.c.agents.iter().map(|a| a.node.clone()).collect();
        self.c
            .wait_nodes("every node ready", Duration::from_secs(60), |nodes| {
                names
                    .iter()
                    .all(|n| gantry_tests::cluster::state_of(nodes, n) == Some("ready"))
            });
    }
}

#[test]
fn jobs_survive_a_seeded_schedule_of_faults() {
    let seed = env_number("GANTRY_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let rounds = env_number("GANTRY_CHAOS_ROUNDS").map_or(DEFAULT_ROUNDS, |r| r as usize);
    eprintln!("chaos seed: {seed} (replay with GANTRY_CHAOS_SEED={seed}); rounds: {rounds}");
    let started = Instant::now();
    let c = TestCluster::start(ClusterSpec {
        agents: HOSTS,
        simulate_gpus: Some(GPUS.into()),
        busybox: true,
        echo: true,
        ..ClusterSpec::default()
    });
    c.deploy(MANIFEST);
    let baseline_mounts: Vec<Vec<String>> =
        c.agents.iter().map(|a| mounts_below(&a.state)).collect();
    let hosts: Vec<Host> = c.agents.iter().map(|a| a.host.clone()).collect();
    let mut chaos = Chaos {
        c,
        rng: StdRng::seed_from_u64(seed),
        unsettled: Arc::default(),
        jobs: Vec::new(),
        calls: Vec::new(),
        faults: BTreeMap::new(),
    };

    // The sampler: checks the instantaneous invariants until told to stop (also when the
    // test fails: the guard drops before the cluster).
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_on_drop = StopOnDrop(stop.clone());
    let violations = Arc::new(Mutex::new(BTreeSet::new()));
    let sampler = {
        let (stop, violations, unsettled) =
            (stop.clone(), violations.clone(), chaos.unsettled.clone());
        std::thread::spawn(move || {
            let mut samples = 0u64;
            let mut seen = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let u = unsettled.lock().unwrap_or_else(|e| e.into_inner());
                let mut v = violations.lock().unwrap_or_else(|e| e.into_inner());
                // The hosts vanish when the test fails and drops the cluster: stop then.
                let sample = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check_sample(&hosts, &u, &mut v)
                }));
                drop((u, v));
                let Ok(sample) = sample else { break };
                seen.extend(sample);
                samples += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
            (samples, seen.len())
        })
    };

    for round in 0..rounds {
        chaos.submit_round();
        chaos.call_round(round);
        let fault = FAULTS[chaos.rng.random_range(0..FAULTS.len())];
        eprintln!("chaos: round {round} of {rounds} ({:?})", started.elapsed());
        chaos.fault(fault);
        chaos.pause_for(0.5, 2.0);
    }
    chaos.wait_ready();

    // Every accepted job ends, as it should.
    let ids: Vec<(String, Kind)> = chaos.jobs.clone();
    let mut endings = BTreeMap::new();
    let mut wrong = Vec::new();
    for (id, kind) in &ids {
        let mut last = Value::Null;
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(
                &format!("job {id} to end"),
                Duration::from_secs(120),
                || {
                    last = chaos.c.job(id);
                    ["succeeded", "failed", "cancelled"]
                        .contains(&last["state"].as_str().unwrap_or(""))
                        .then(|| last.clone())
                },
            )
        }));
        let job = finished.unwrap_or_else(|_| panic!("job {id} ({kind:?}) never ended: {last}"));
        let generations = job["attempts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["generation"].as_u64())
            .max()
            .unwrap_or(0);
        *endings
            .entry(format!("{} in {generations} generation(s)", job["state"]))
            .or_insert(0usize) += 1;
        wrong.extend(wrong_ending(*kind, &job));
    }
    // Every accepted function input ends once, as it should.
    let mut inputs_ended: BTreeMap<String, usize> = BTreeMap::new();
    for (id, texts) in &chaos.calls {
        let call = wait_until(
            &format!("call {id} to end"),
            Duration::from_secs(180),
            || {
                let r = chaos
                    .c
                    .http()
                    .get(format!("http://{}/v1/calls/{id}?wait=5s", chaos.c.api))
                    .bearer_auth(&chaos.c.admin)
                    .send()
                    .ok()?;
                let v: Value = r.json().ok()?;
                (v["state"].is_string() && v["state"] != "running").then_some(v)
            },
        );
        let results = call["results"].as_array().cloned().unwrap_or_default();
        if results.len() != texts.len() {
            wrong.push(format!(
                "call {id}: {} results for {} inputs",
                results.len(),
                texts.len()
            ));
        }
        for (r, text) in results.iter().zip(texts) {
            let state = r["state"].as_str().unwrap_or("?");
            let cause = r["error"]["cause"].as_str().unwrap_or("");
            *inputs_ended
                .entry(format!("{state} {cause}").trim().to_owned())
                .or_default() += 1;
            if state == "failed" && cause == "platform" {
                eprintln!(
                    "chaos: call {id} input {}: the platform gave it up: {}",
                    r["index"], r["error"]["message"]
                );
                continue;
            }
            let right = if let Some(msg) = text.strip_prefix("fail:") {
                state == "failed" && cause == "user" && r["error"]["message"] == msg
            } else if let Some(ms) = text.strip_prefix("sleep:") {
                state == "succeeded" && r["output"]["text"] == format!("slept {ms}")
            } else {
                state == "succeeded" && r["output"]["text"] == text.as_str()
            };
            if !right {
                wrong.push(format!("call {id} input {text:?} ended wrongly: {r}"));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (samples, seen) = sampler.join().expect("sampler");
    // The sampler must have seen the work, or its checks mean nothing.
    assert!(
        seen >= ids.len() / 2,
        "the sampler saw only {seen} attempts alive of {} jobs",
        ids.len()
    );

    // Nothing left behind: containers (function containers go once idle for their
    // scaledown window, and a drain lost to a fault goes again), mounts, cgroups.
    for (i, a) in chaos.c.agents.iter().enumerate() {
        let mut told: Option<Instant> = None;
        wait_until(
            &format!("no container left on {}", a.node),
            Duration::from_secs(30),
            || {
                let functions = function_containers(&a.host);
                if !functions.is_empty() && told.is_none_or(|t| t.elapsed().as_secs() >= 5) {
                    told = Some(Instant::now());
                    let app = chaos
                        .c
                        .http()
                        .get(format!("http://{}/v1/apps/chaos", chaos.c.api))
                        .bearer_auth(&chaos.c.admin)
                        .send()
                        .and_then(|r| r.text())
                        .unwrap_or_default();
                    eprintln!(
                        "{}: function containers {functions:?}; the app: {app}",
                        a.node
                    );
                }
                (alive(&a.host).is_empty() && functions.is_empty()).then_some(())
            },
        );
        let parent = gantry_agent::runtime::cgroup::parent_for(&a.state);
        wait_until(
            &format!("no mount or cgroup left by {}", a.node),
            Duration::from_secs(20),
            || {
                let mounts = mounts_below(&a.state);
                let extra: Vec<&String> = mounts
                    .iter()
                    .filter(|m| !baseline_mounts[i].contains(m))
                    .collect();
                let cgroups = cgroups_below(&parent);
                if !extra.is_empty() || !cgroups.is_empty() {
                    eprintln!("{}: mounts {extra:?}, cgroups {cgroups:?}", a.node);
                    return None;
                }
                Some(())
            },
        );
    }

    let violations = violations.lock().unwrap_or_else(|e| e.into_inner()).clone();
    eprintln!(
        "chaos: seed {seed}, {rounds} rounds, {} jobs, {} function calls (inputs: {inputs_ended:?}), faults {:?}, endings {endings:?}, {samples} samples saw {seen} attempts alive, {:?}",
        ids.len(),
        chaos.calls.len(),
        chaos.faults,
        started.elapsed()
    );
    assert!(
        wrong.is_empty() && violations.is_empty(),
        "seed {seed} (replay with GANTRY_CHAOS_SEED={seed}):\njobs that ended wrongly:\n{}\ninvariants violated:\n{}",
        wrong.join("\n"),
        violations.iter().cloned().collect::<Vec<_>>().join("\n")
    );
}
