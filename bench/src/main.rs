//! `gantry-bench`: Gantry's benchmarks. Never run from `cargo test`; `bench/run` drives it.
//!
//! `cold-start` measures, for one cached root filesystem, the time from the start call to
//! the container's first instruction of user code: the container runs a static program
//! that prints the wall clock in nanoseconds, and the benchmark subtracts the wall clock
//! it read just before starting. The same program and rootfs run under Gantry's runtime
//! API, under the `gantry-agent run` command, and under `runc run`, `crun run` and
//! `podman run --rm`, interleaved round by round so machine noise hits all alike.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

mod builds;
mod cpu;
mod footprint;
mod function_sim;
mod functions;
mod gossip;
mod http_load;
mod placement;
mod recovery;
mod schedule;
mod submit;
mod web;
use clap::{Parser, Subcommand};
use gantry_agent::image::{ImageConfig, ImageStore, PullConfig};
use gantry_agent::runtime::{ContainerRequest, Runtime, RuntimeConfig, Stream};
use gantry_agent::store::LocalStore;

#[derive(Parser)]
#[command(
    name = "gantry-bench",
    about = "Gantry benchmarks (see bench/README.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The whole path with real processes: durable submissions per second and
    /// submit-to-running latency.
    Submit {
        #[arg(long)]
        coordinator: PathBuf,
        #[arg(long)]
        agent: PathBuf,
        /// A root filesystem containing the static `/stamp` program.
        #[arg(long)]
        rootfs: PathBuf,
        /// Jobs run one after another for the latency.
        #[arg(long, default_value_t = 100)]
        jobs: usize,
        /// Submissions for the throughput.
        #[arg(long, default_value_t = 1000)]
        burst: usize,
        #[arg(long, default_value = "/tmp/gantry-bench-submit")]
        work: PathBuf,
        /// The `gantry` CLI: also time `gantry run … -- true` round trips.
        #[arg(long)]
        cli: Option<PathBuf>,
        /// `gantry run` round trips.
        #[arg(long, default_value_t = 100)]
        cli_runs: usize,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Gossip membership, all members in this process on loopback: convergence, change
    /// propagation, failure detection and bytes per node, per cluster size.
    Gossip {
        /// Cluster sizes (agents; an observer named like the coordinator comes on top).
        #[arg(long, value_delimiter = ',', default_value = "10,50,100,200")]
        members: Vec<usize>,
        /// Change and detection trials per cluster size.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Gossip interval of every member (default: Gantry's, 200ms).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// Phi threshold of every member (default: Gantry's, 6).
        #[arg(long)]
        phi: Option<f64>,
        /// Steady-state window for bytes per node and CPU.
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        window: Duration,
        /// Pause after a restarted member is visible again, before the next detection.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        settle: Duration,
        /// Longest each phase of trials runs per cluster size (fewer trials if reached).
        #[arg(long, default_value = "150s", value_parser = humantime::parse_duration)]
        phase_budget: Duration,
        /// Seed for the choice of members and values (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The placement engine alone, in process: decisions per second and latency per
    /// decision at several cluster sizes.
    Placement {
        /// Cluster sizes in nodes.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
        nodes: Vec<usize>,
        /// Timed decisions per cluster size.
        #[arg(long, default_value_t = 200_000)]
        decisions: usize,
        /// Share of GPUs kept in use (the oldest jobs are released above it).
        #[arg(long, default_value_t = 0.8)]
        utilization: f64,
        /// Seed for the job mix (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// The coordinator's durable pipeline in process: jobs accepted (group commit) and
    /// placed (the scheduler's pass) per second.
    Schedule {
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Concurrent writers creating jobs.
        #[arg(long, default_value_t = 64)]
        threads: usize,
        /// Simulated ready nodes (8 GPUs, 256 cores each).
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value = "/tmp/gantry-bench-schedule")]
        work: PathBuf,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Recovery on test hosts (root; network namespaces): kill -9 of a host, a preemption
    /// notice, an injected Xid, each to the job running again elsewhere.
    Recovery {
        /// Trials of each fault.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Functions on a test host (root; network namespaces): warm sync call round trip, a
    /// map over 4 warm containers, scale from zero, 0 -> N containers.
    Functions {
        /// Timed sequential warm calls.
        #[arg(long, default_value_t = 2000)]
        calls: usize,
        /// Inputs of the map.
        #[arg(long, default_value_t = 20_000)]
        map_inputs: usize,
        /// `max_inputs` of each of the map's 4 containers.
        #[arg(long, default_value_t = 8)]
        map_max_inputs: u32,
        /// Scale-from-zero trials.
        #[arg(long, default_value_t = 20)]
        cold_trials: usize,
        /// Containers of the 0 -> N measurement.
        #[arg(long, default_value_t = 20)]
        fleet: u32,
        #[arg(long, default_value_t = 3)]
        fleet_trials: usize,
        /// `cpu` of every function container.
        #[arg(long, default_value = "1")]
        cpu: String,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Web endpoints on a test host (root; network namespaces): requests through the
    /// ingress to 4 warm containers against the same servers directly, and scale from zero
    /// to the first byte.
    Web {
        /// Requests one at a time, each way.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Requests of the concurrent load, each way.
        #[arg(long, default_value_t = 10_000)]
        load_requests: usize,
        /// Requests at once in the concurrent load (busybox httpd's listen backlog is 9:
        /// more than ~8 per container overflows it directly, and SYNs wait 1 s to retry).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Scale-from-zero trials.
        #[arg(long, default_value_t = 20)]
        cold_trials: usize,
        /// `cpu` of every container.
        #[arg(long, default_value = "1")]
        cpu: String,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The web benchmarks' load generator alone, against a loopback address (what
    /// `bench/ray_web.py` runs against Ray Serve's HTTP proxy); prints JSON.
    HttpLoad {
        /// A loopback address (127.0.0.0/8).
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// What every body must be.
        #[arg(long)]
        expect_body: Option<String>,
    },
    /// Functions on the in-process simulation (the real coordinator against fake agents on
    /// a virtual clock): simulated time from a map's acceptance to N containers decided
    /// and ready, and the wall time it took.
    FunctionsSim {
        /// Seeds, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        seeds: Vec<u64>,
        #[arg(long, default_value_t = 250)]
        nodes: usize,
        /// Containers to reach.
        #[arg(long, default_value_t = 200)]
        containers: u32,
        /// The function's `max_containers`.
        #[arg(long, default_value_t = 250)]
        max_containers: u32,
        /// Inputs of the map (one container each, up to `max_containers`).
        #[arg(long, default_value_t = 1000)]
        inputs: usize,
        /// Virtual time per step of the simulation.
        #[arg(long, default_value = "5ms", value_parser = humantime::parse_duration)]
        step: Duration,
        /// Shortest and longest simulated start of a container (to its `ready`).
        #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
        start_min: Duration,
        #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
        start_max: Duration,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Container cold start with a cached image, side by side with runc, crun and podman.
    ColdStart {
        /// The gantry-agent binary (shims are started from it).
        #[arg(long)]
        agent: PathBuf,
        /// A root filesystem containing the static `/stamp` program.
        #[arg(long)]
        rootfs: PathBuf,
        /// Starts per runtime.
        #[arg(long, default_value_t = 200)]
        runs: usize,
        /// Starts for podman (slow; at least 20).
        #[arg(long, default_value_t = 50)]
        podman_runs: usize,
        /// Scratch directory (state dirs, bundles).
        #[arg(long, default_value = "/tmp/gantry-bench")]
        work: PathBuf,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Image builds from recipes on `gantry dev` (the `gantry` beside this binary): the
    /// first build of a `debian_slim` recipe, the same recipe cached, and one with its
    /// last step changed.
    Builds {
        /// Rebuilds timed per kind.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        #[arg(long, default_value = "/tmp/gantry-bench-builds")]
        work: PathBuf,
        /// Also write the results as JSON here (for BENCHMARKS.md).
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Resource footprint: agent RSS idle and with N containers, shim RSS (one agent on
    /// loopback); the coordinator's in-process state with many nodes and jobs.
    Footprint {
        #[arg(long)]
        coordinator: PathBuf,
        #[arg(long)]
        agent: PathBuf,
        /// A root filesystem (busybox).
        #[arg(long)]
        rootfs: PathBuf,
        /// Containers running for the loaded measurement.
        #[arg(long, default_value_t = 50)]
        containers: usize,
        #[arg(long, default_value = "/tmp/gantry-bench-footprint")]
        work: PathBuf,
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // chitchat warns on every datagram refused by a stopped member, which the gossip
        // benchmark stops on purpose.
        .with_env_filter("warn,chitchat=error")
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Submit {
            coordinator,
            agent,
            rootfs,
            jobs,
            burst,
            work,
            cli,
            cli_runs,
            json,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(submit::run(submit::SubmitBench {
                coordinator_bin: &coordinator,
                agent_bin: &agent,
                cli_bin: cli.as_deref(),
                rootfs: &rootfs,
                jobs: jobs.max(1),
                burst: burst.max(1),
                cli_runs,
                work: &work,
                json: json.as_deref(),
            }))
        }
        Cmd::Gossip {
            members,
            trials,
            interval,
            phi,
            window,
            settle,
            phase_budget,
            seed,
        } => {
            if members.is_empty() || members.iter().any(|&n| n == 0 || n > gossip::MAX_MEMBERS) {
                bail!("--members takes sizes from 1 to {}", gossip::MAX_MEMBERS);
            }
            let defaults = gantry_membership::MembershipConfig::default();
            let membership = gantry_membership::MembershipConfig {
                gossip_interval: interval.unwrap_or(defaults.gossip_interval),
                phi_threshold: phi.unwrap_or(defaults.phi_threshold),
                ..defaults
            };
            let bench = gossip::GossipBench {
                members,
                trials: trials.max(1),
                membership,
                window: window.max(Duration::from_secs(1)),
                settle,
                phase_budget,
                seed: seed.unwrap_or(now_ns() as u64),
            };
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(gossip::run(bench))
        }
        Cmd::Placement {
            nodes,
            decisions,
            utilization,
            seed,
        } => {
            if nodes.is_empty() || nodes.contains(&0) || !(0.0..=1.0).contains(&utilization) {
                bail!("--nodes takes sizes of at least 1, --utilization a share from 0 to 1");
            }
            placement::run(placement::PlacementBench {
                sizes: nodes,
                decisions: decisions.max(1),
                utilization,
                seed: seed.unwrap_or(now_ns() as u64),
            })
        }
        Cmd::Schedule {
            jobs,
            threads,
            nodes,
            work,
            json,
        } => schedule::run(schedule::ScheduleBench {
            jobs,
            threads,
            nodes,
            work,
            json,
        }),
        Cmd::Recovery { trials, json } => recovery::run(recovery::RecoveryBench {
            trials: trials.max(1),
            json,
        }),
        Cmd::Functions {
            calls,
            map_inputs,
            map_max_inputs,
            cold_trials,
            fleet,
            fleet_trials,
            cpu,
            json,
        } => functions::run(functions::FunctionsBench {
            calls: calls.max(1),
            map_inputs: map_inputs.max(1),
            map_max_inputs: map_max_inputs.max(1),
            cold_trials: cold_trials.max(1),
            fleet: fleet.max(1),
            fleet_trials: fleet_trials.max(1),
            cpu,
            json,
        }),
        Cmd::Web {
            requests,
            load_requests,
            concurrency,
            cold_trials,
            cpu,
            json,
        } => web::run(web::WebBench {
            requests: requests.max(web::ROUNDS),
            load_requests: load_requests.max(1),
            concurrency: concurrency.max(1),
            cold_trials: cold_trials.max(1),
            cpu,
            json,
        }),
        Cmd::HttpLoad {
            addr,
            path,
            requests,
            concurrency,
            expect_body,
        } => {
            let o = http_load::run(http_load::Load {
                target: http_load::Target::Addr(addr),
                path,
                token: None,
                requests,
                concurrency: concurrency.max(1),
                expect_body: expect_body.map(String::into_bytes),
                deadline: Duration::from_secs(300),
            })?;
            println!("{}", o.to_json());
            Ok(())
        }
        Cmd::FunctionsSim {
            seeds,
            nodes,
            containers,
            max_containers,
            inputs,
            step,
            start_min,
            start_max,
            json,
        } => function_sim::run(function_sim::FunctionSimBench {
            seeds,
            nodes,
            containers,
            max_containers,
            inputs,
            step,
            start_min,
            start_max,
            json,
        }),
        Cmd::ColdStart {
            agent,
            rootfs,
            runs,
            podman_runs,
            work,
            json,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(cold_start(
                &agent,
                &rootfs,
                runs,
                podman_runs.max(20),
                &work,
                json.as_deref(),
            ))
        }
        Cmd::Builds { rounds, work, json } => {
            builds::run(builds::BuildsBench { work, rounds, json })
        }
        Cmd::Footprint {
            coordinator,
            agent,
            rootfs,
            containers,
            work,
            json,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(footprint::run(footprint::FootprintBench {
                coordinator_bin: &coordinator,
                agent_bin: &agent,
                rootfs: &rootfs,
                containers: containers.max(1),
                work: &work,
                json: json.as_deref(),
            }))
        }
    }
}

/// The `p`th percentile (nearest rank) of `samples`; `None` when there are none.
pub(crate) fn percentile(samples: &[f64], p: f64) -> Option<f64> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((p / 100.0) * s.len().saturating_sub(1) as f64).round() as usize)
        .copied()
}

/// Resident memory of process `pid` in KiB (`VmRSS`).
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

pub(crate) fn now_ns() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Parses the stamp the container printed and returns the latency in milliseconds.
fn latency_ms(t0: i128, output: &[u8]) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(output);
    let stamp: i128 = text
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .parse()
        .with_context(|| format!("container printed no stamp: {text:?}"))?;
    Ok((stamp - t0) as f64 / 1e6)
}

struct Series {
    name: String,
    samples: Vec<f64>,
    error: Option<String>,
}

impl Series {
    fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            samples: Vec::new(),
            error: None,
        }
    }

    fn percentile(&self, p: f64) -> Option<f64> {
        percentile(&self.samples, p)
    }

    fn record(&mut self, r: anyhow::Result<f64>) {
        match r {
            Ok(ms) => self.samples.push(ms),
            Err(e) if self.error.is_none() => self.error = Some(format!("{e:#}")),
            Err(_) => {}
        }
    }
}

/// An OCI bundle for runc/crun over the same rootfs: `runc spec`, then our args.
/// Imports `rootfs` as image `bench` into the agent state at `state`, through the operator
/// command.
pub(crate) fn import_bench_image(agent: &Path, state: &Path, rootfs: &Path) -> anyhow::Result<()> {
    let st = Command::new(agent)
        .env("GANTRY_STATE_DIR", state)
        .args(["image", "import"])
        .arg(rootfs)
        .args(["--name", "bench"])
        .stdout(Stdio::null())
        .status()
        .with_context(|| format!("running {}", agent.display()))?;
    if !st.success() {
        bail!("`gantry-agent image import {}` failed", rootfs.display());
    }
    Ok(())
}

fn make_bundle(work: &Path, rootfs: &Path) -> anyhow::Result<PathBuf> {
    let bundle = work.join("bundle");
    std::fs::create_dir_all(&bundle)?;
    let _ = std::fs::remove_file(bundle.join("config.json"));
    let st = Command::new("runc")
        .arg("spec")
        .current_dir(&bundle)
        .status()
        .context("runc spec (apt-get install runc)")?;
    if !st.success() {
        bail!("runc spec failed");
    }
    let mut spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    spec["root"]["path"] = serde_json::json!(rootfs);
    spec["root"]["readonly"] = serde_json::json!(true);
    spec["process"]["terminal"] = serde_json::json!(false);
    spec["process"]["args"] = serde_json::json!(["/stamp"]);
    // Same rule as Gantry: never raise an rlimit above the current hard limit.
    let hard = nix_hard_nofile();
    spec["process"]["rlimits"] =
        serde_json::json!([{"type": "RLIMIT_NOFILE", "hard": hard, "soft": hard}]);
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    Ok(bundle)
}

fn nix_hard_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_max.min(1 << 20)
    } else {
        1024
    }
}

fn run_oci_cli(bin: &str, root: &Path, bundle: &Path, id: &str) -> anyhow::Result<f64> {
    let t0 = now_ns();
    let out = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {bin}"))?;
    if !out.status.success() {
        let _ = Command::new(bin)
            .arg("--root")
            .arg(root)
            .args(["delete", "-f", id])
            .output();
        bail!(
            "{bin} run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    latency_ms(t0, &out.stdout)
}

fn run_podman(rootfs: &Path) -> anyhow::Result<f64> {
    let t0 = now_ns();
    let out = Command::new("podman")
        .args([
            "run",
            "--rm",
            "--runtime",
            "runc",
            "--network",
            "host",
            "--cgroup-manager",
            "cgroupfs",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
            "--rootfs",
        ])
        .arg(rootfs)
        .arg("/stamp")
        .stdin(Stdio::null())
        .output()
        .context("running podman (apt-get install podman)")?;
    if !out.status.success() {
        bail!(
            "podman run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    latency_ms(t0, &out.stdout)
}

/// Where a Gantry start spends its time, from the shim's "container started" log line.
#[derive(Default)]
struct Breakdown {
    mount: Vec<f64>,
    create: Vec<f64>,
}

fn shim_phase_ms(log: &str, key: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("container started"))?;
    let v = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
    v.parse::<f64>().ok().map(|us| us / 1000.0)
}

async fn run_gantry(rt: &Runtime, breakdown: &mut Breakdown) -> anyhow::Result<f64> {
    let mut req = ContainerRequest::new("bench");
    req.command = Some(vec!["/stamp".into()]);
    let t0 = now_ns();
    let id = rt.start(req).await?.id;
    let exit = rt.wait(&id).await?;
    let out = rt.logs(&id, Stream::Stdout)?;
    let shim_log = std::fs::read_to_string(rt.log_dir(&id)?.join("shim.log")).unwrap_or_default();
    if let (Some(m), Some(c)) = (
        shim_phase_ms(&shim_log, "mount_us="),
        shim_phase_ms(&shim_log, "create_us="),
    ) {
        breakdown.mount.push(m);
        breakdown.create.push(c - m);
    }
    rt.remove(&id)?;
    if exit.code() != 0 {
        bail!("stamp exited with {}", exit.code());
    }
    latency_ms(t0, &out)
}

fn run_gantry_cli(agent: &Path, state: &Path) -> anyhow::Result<f64> {
    let t0 = now_ns();
    let out = Command::new(agent)
        .env("GANTRY_STATE_DIR", state)
        .args(["run", "--image", "bench", "--", "/stamp"])
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        bail!(
            "gantry-agent run failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    latency_ms(t0, &out.stdout)
}

async fn cold_start(
    agent: &Path,
    rootfs: &Path,
    runs: usize,
    podman_runs: usize,
    work: &Path,
    json: Option<&Path>,
) -> anyhow::Result<()> {
    if !rootfs.join("stamp").is_file() {
        bail!("{} has no /stamp; bench/run builds it", rootfs.display());
    }
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work)?;
    // Gantry, in process: the runtime API as the agent daemon will call it.
    let api_state = work.join("api-state");
    let store = LocalStore::open(&api_state.join("db"))?;
    let images = ImageStore::open(&api_state.join("images"), &store, PullConfig::default())?;
    images
        .import(rootfs, "bench", ImageConfig::default())
        .await?;
    let runtime = Runtime::open(RuntimeConfig::new(&api_state, agent), images, &store).await?;
    // Gantry through its operator command (a new agent process per start).
    let cli_state = work.join("cli-state");
    import_bench_image(agent, &cli_state, rootfs)?;
    let bundle = make_bundle(work, rootfs)?;
    let runc_root = work.join("runc-root");
    let crun_root = work.join("crun-root");

    let mut api = Series::new("Gantry runtime API (`Runtime::start`)");
    let mut cli = Series::new("`gantry-agent run` (new agent process per start)");
    let mut runc = Series::new("`runc run`");
    let mut crun = Series::new("`crun run`");
    let mut podman = Series::new("`podman run --rm`");
    // Warm-up: page cache, binaries.
    let mut breakdown = Breakdown::default();
    for _ in 0..5 {
        let _ = run_gantry(&runtime, &mut Breakdown::default()).await;
        let _ = run_oci_cli("runc", &runc_root, &bundle, "warm");
    }
    for i in 0..runs {
        api.record(run_gantry(&runtime, &mut breakdown).await);
        cli.record(run_gantry_cli(agent, &cli_state));
        runc.record(run_oci_cli("runc", &runc_root, &bundle, &format!("b{i}")));
        if crun.error.is_none() {
            crun.record(run_oci_cli("crun", &crun_root, &bundle, &format!("b{i}")));
        }
        if i < podman_runs && podman.error.is_none() {
            podman.record(run_podman(rootfs));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    print_table(&[&api, &cli, &runc, &crun, &podman], &runc, runs);
    if let Some(path) = json {
        let entry = |s: &Series| {
            serde_json::json!({
                "p50_ms": s.percentile(50.0),
                "p99_ms": s.percentile(99.0),
                "starts": s.samples.len(),
                "error": s.error.as_deref().and_then(|e| e.lines().next()),
            })
        };
        let v = serde_json::json!({
            "gantry_runtime_api": entry(&api),
            "gantry_agent_run": entry(&cli),
            "runc": entry(&runc),
            "crun": entry(&crun),
            "podman": entry(&podman),
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let median = |v: &[f64]| percentile(v, 50.0).unwrap_or(f64::NAN);
    println!();
    println!(
        "Inside a Gantry start (medians, from the shim's log): overlay mount {:.1} ms, libcontainer create (cgroups, namespaces, rootfs, init up to exec wait) {:.1} ms; the rest of the {:.1} ms p50 is the agent's preparation, handing the container to a pre-started shim, `start` and the exec of /stamp.",
        median(&breakdown.mount),
        median(&breakdown.create),
        api.percentile(50.0).unwrap_or(f64::NAN)
    );
    Ok(())
}

fn print_table(all: &[&Series], baseline: &Series, runs: usize) {
    let base = baseline.percentile(50.0);
    println!("| runtime | starts | p50 (ms) | p99 (ms) | p50 vs `runc run` |");
    println!("|---|---|---|---|---|");
    for s in all {
        match (s.percentile(50.0), s.percentile(99.0)) {
            (Some(p50), Some(p99)) if std::ptr::eq(*s, baseline) => {
                println!(
                    "| {} | {} | {:.1} | {:.1} | baseline |",
                    s.name,
                    s.samples.len(),
                    p50,
                    p99
                );
            }
            (Some(p50), Some(p99)) => {
                let ratio = base
                    .map(|b| {
                        format!(
                            "{:.2}× {}",
                            if p50 < b { b / p50 } else { p50 / b },
                            if p50 < b { "faster" } else { "slower" }
                        )
                    })
                    .unwrap_or_default();
                println!(
                    "| {} | {} | {:.1} | {:.1} | {} |",
                    s.name,
                    s.samples.len(),
                    p50,
                    p99,
                    ratio
                );
            }
            _ => println!(
                "| {} | 0 | — | — | did not run: {} |",
                s.name,
                s.error
                    .as_deref()
                    .unwrap_or("no samples")
                    .replace('|', "/")
                    .lines()
                    .next()
                    .unwrap_or("")
            ),
        }
        if let (Some(e), false) = (&s.error, s.samples.is_empty()) {
            eprintln!("{}: some starts failed: {e}", s.name);
        }
    }
    println!();
    println!(
        "{runs} rounds, interleaved; latency = wall clock printed by the container's first instruction minus the wall clock just before the start call."
    );
}
