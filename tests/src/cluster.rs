//! A Gantry cluster on test hosts: a coordinator in the root namespace, bound to the
//! bridge address, and N agents, each on its own [`crate::netns`] host with its own state
//! directory, joined with a real token and started with `gantry-agent serve`.
//!
//! Faults are the hosts' ([`TestCluster::kill_host`], `pause`, `partition`, …) plus
//! [`TestCluster::kill_agent`] (only the agent process, its shims and containers stay) and
//! [`TestCluster::start_agent`] (a restart). Everything is cleaned up by the [`TestNet`]
//! when the cluster is dropped, also when a test panics: every agent's state directory is
//! registered for unmounting and its cgroup parent for removal.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::{Host, TestNet, wait_until};
use crate::{Proc, binary, field};

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub agents: usize,
    /// `--simulate-gpus` for every agent.
    pub simulate_gpus: Option<String>,
    /// cpu and memory each agent offers.
    pub cpus: String,
    pub memory: String,
    /// Import a busybox root filesystem as image `busybox` on every agent.
    pub busybox: bool,
    /// Import busybox with the example function runtime (`/app/runtime`) as image `echo`
    /// on every agent (see [`crate::functions_fixture`]).
    pub echo: bool,
    /// Import busybox with the WebSocket echo server (`/app/ws-echo`) as image `ws-echo` on
    /// every agent (see [`crate::functions_fixture`]).
    pub ws_echo: bool,
    /// The API (and the embedded registry) serves HTTPS with a certificate the cluster CA
    /// issues for the bridge address (`[api] tls_names`); clients here trust that CA.
    pub api_tls: bool,
    /// The coordinator's and agents' logs go to files under the cluster's directory
    /// (`logs/`), for a test to read, instead of the test's output.
    pub logs_to_files: bool,
    /// Every agent declares the cluster directory's `shared/` as its shared volume
    /// storage (`[volumes] shared_path`): one directory all of them see, as an NFS
    /// mount would be.
    pub shared_volumes: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        Self {
            agents: 1,
            simulate_gpus: None,
            cpus: "4".into(),
            memory: "4G".into(),
            busybox: false,
            echo: false,
            ws_echo: false,
            api_tls: false,
            logs_to_files: false,
            shared_volumes: false,
        }
    }
}

/// One agent: its host, node name and state directory, and the process while it runs.
pub struct TestAgent {
    pub node: String,
    pub host: Host,
    pub state: PathBuf,
    pub proc: Option<Proc>,
    /// Extra `serve` flags (labels).
    pub serve_args: Vec<String>,
}

/// Fields drop in order: processes first, then the net (kills what is left, unmounts,
/// removes cgroups and links), then the directories.
pub struct TestCluster {
    pub agents: Vec<TestAgent>,
    pub coordinator: Proc,
    pub net: TestNet,
    pub spec: ClusterSpec,
    pub api: String,
    /// The web endpoints' ingress (kept across coordinator restarts).
    pub ingress: String,
    pub control: String,
    pub gossip: String,
    pub admin: String,
    pub dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts the coordinator and every agent, and waits until the coordinator has every
    /// node ready.
    pub fn start(spec: ClusterSpec) -> Self {
        let mut net = TestNet::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let bridge = net.bridge_ip();
        // A fixed gossip port, so a restarted coordinator is where the members look for it
        // (the API and control ports are kept from what the first start bound).
        let gossip = std::net::UdpSocket::bind((bridge, 0))
            .and_then(|s| s.local_addr())
            .expect("a free gossip port")
            .to_string();
        // Its own configuration file, never the host's.
        let config = match spec.api_tls {
            true => format!("[api]\ntls_names = [\"{bridge}\"]\n"),
            false => String::new(),
        };
        std::fs::write(dir.path().join("coordinator.toml"), config).expect("coordinator.toml");
        let mut first = coordinator_command(
            dir.path(),
            [&format!("{bridge}:0"), &format!("{bridge}:0")],
            &format!("{bridge}:0"),
            &gossip,
        );
        if spec.logs_to_files {
            first.stderr(log_file(dir.path(), "coordinator"));
        }
        let mut coordinator = Proc::spawn(first);
        let lines = coordinator.lines_until("control listening on");
        let api = field(&lines, "api listening on").expect("api address");
        let ingress = field(&lines, "ingress listening on").expect("ingress address");
        let control = field(&lines, "control listening on").expect("control address");
        let admin = field(&lines, "admin token (shown once, store it safely):").expect("admin");
        let rootfs = dir.path().join("rootfs");
        if spec.busybox {
            crate::busybox_rootfs(&rootfs);
        }
        let echo_rootfs = dir.path().join("echo-rootfs");
        if spec.echo {
            crate::functions_fixture::echo_rootfs(&echo_rootfs);
        }
        let ws_echo_rootfs = dir.path().join("ws-echo-rootfs");
        if spec.ws_echo {
            crate::functions_fixture::ws_echo_rootfs(&ws_echo_rootfs);
        }
        let mut agents = Vec::new();
        for i in 0..spec.agents {
            let node = format!("node-{i}");
            let host = net.add_host(&node);
            let state = dir.path().join(&node);
            std::fs::create_dir_all(&state).expect("agent state dir");
            if spec.shared_volumes {
                let shared = dir.path().join("shared");
                std::fs::create_dir_all(&shared).expect("shared volume storage");
                std::fs::write(
                    state.join("agent.toml"),
                    format!("[volumes]\nshared_path = \"{}\"\n", shared.display()),
                )
                .expect("agent.toml");
            }
            net.register_cleanup_dir(&state);
            net.register_cgroup(gantry_agent::runtime::cgroup::parent_for(&state));
            agents.push(TestAgent {
                node,
                host,
                state,
                proc: None,
                serve_args: Vec::new(),
            });
        }
        let mut c = Self {
            agents,
            coordinator,
            net,
            spec,
            api,
            ingress,
            control,
            gossip,
            admin,
            dir,
        };
        for i in 0..c.agents.len() {
            if c.spec.busybox {
                crate::import_busybox(c.agent_command(i), &rootfs);
            }
            if c.spec.echo {
                crate::functions_fixture::import_echo(c.agent_command(i), &echo_rootfs);
            }
            if c.spec.ws_echo {
                crate::functions_fixture::import_ws_echo(c.agent_command(i), &ws_echo_rootfs);
            }
            c.join(i);
            c.start_agent(i);
        }
        let names: Vec<String> = c.agents.iter().map(|a| a.node.clone()).collect();
        c.wait_nodes("every node ready", Duration::from_secs(30), |nodes| {
            names.iter().all(|n| state_of(nodes, n) == Some("ready"))
        });
        c
    }

    /// kill -9 of the coordinator, then a start on the same state and addresses; returns
    /// once it serves again.
    pub fn restart_coordinator(&mut self) {
        self.coordinator.kill9();
        let cmd = coordinator_command(
            self.dir.path(),
            [self.api.trim_start_matches("https://"), &self.ingress],
            &self.control,
            &self.gossip,
        );
        let started = Instant::now();
        // The old sockets are gone with the process; a bind can still race the kernel
        // releasing them, so a start that fails is tried again for a while.
        loop {
            let mut again = cmd_clone(&cmd);
            if self.spec.logs_to_files {
                again.stderr(log_file(self.dir.path(), "coordinator"));
            }
            let mut p = Proc::spawn(again);
            let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                p.lines_until("control listening on")
            }));
            if ready.is_ok() {
                self.coordinator = p;
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the coordinator did not start again within 10 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts the coordinator (after it was stopped) expecting it to refuse: returns its
    /// error output once it exited non-zero. Panics if it is still up after 15 s.
    pub fn coordinator_refuses_to_start(&self) -> String {
        let mut cmd = coordinator_command(
            self.dir.path(),
            [self.api.trim_start_matches("https://"), &self.ingress],
            &self.control,
            &self.gossip,
        );
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the coordinator");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                assert!(!status.success(), "the coordinator exited 0");
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                return err;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the coordinator started although it should have refused");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Injects Xid `xid` on simulated GPU `gpu` of agent `i` (`gantry-agent gpu inject`).
    pub fn inject_xid(&self, i: usize, gpu: &str, xid: &str) {
        let out = self
            .agent_command(i)
            .args(["gpu", "inject", "--index", gpu, "--xid", xid])
            .output()
            .expect("gpu inject");
        assert!(
            out.status.success(),
            "gpu inject: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `gantry-agent` with agent `i`'s state directory, run on its host.
    pub fn agent_command(&self, i: usize) -> Command {
        self.agent_command_with(i, &binary("gantry-agent"))
    }

    /// [`TestCluster::agent_command`] with another `gantry-agent` binary (an upgrade).
    pub fn agent_command_with(&self, i: usize, program: &std::path::Path) -> Command {
        let a = &self.agents[i];
        let mut cmd = a.host.command(program);
        cmd.env("GANTRY_STATE_DIR", &a.state)
            .env("GANTRY_CONFIG", a.state.join("agent.toml"));
        cmd
    }

    /// Joins agent `i` with a fresh one-time token.
    pub fn join(&self, i: usize) {
        let token: Value = self
            .http()
            .post(self.url("/v1/join-tokens"))
            .bearer_auth(&self.admin)
            .json(&serde_json::json!({"ttl": "10m"}))
            .send()
            .expect("join token")
            .json()
            .expect("json");
        let out = self
            .agent_command(i)
            .args(["join", "--coordinator", &self.control, "--node"])
            .arg(&self.agents[i].node)
            .args(["--token", token["token"].as_str().expect("token")])
            .output()
            .expect("join");
        assert!(
            out.status.success(),
            "join {}: {}",
            self.agents[i].node,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The `serve` command of agent `i` (not started).
    pub fn serve_command(&self, i: usize) -> Command {
        let mut cmd = self.agent_command(i);
        cmd.args(["serve", "--coordinator", &self.control]);
        self.serve_flags(&mut cmd);
        cmd.args(&self.agents[i].serve_args);
        cmd
    }

    /// The flags every agent of this cluster serves with, but the coordinator's address.
    pub fn serve_flags(&self, cmd: &mut Command) {
        cmd.args(["--cpus", &self.spec.cpus, "--memory", &self.spec.memory]);
        if let Some(spec) = &self.spec.simulate_gpus {
            cmd.args(["--simulate-gpus", spec]);
        }
    }

    /// Starts (or restarts) agent `i` and waits until it serves.
    pub fn start_agent(&mut self, i: usize) {
        let mut cmd = self.serve_command(i);
        if self.spec.logs_to_files {
            cmd.stderr(log_file(self.dir.path(), &self.agents[i].node));
        }
        let mut p = Proc::spawn(cmd);
        p.line_after("agent serving");
        self.agents[i].proc = Some(p);
    }

    /// kill -9 of agent `i` only: its shims and containers keep running.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut p) = self.agents[i].proc.take() {
            p.kill9();
        }
    }

    /// A clean stop of agent `i` (SIGTERM, as systemd stops it); returns how it exited.
    /// Its shims and containers keep running.
    pub fn stop_agent(&mut self, i: usize) -> std::process::ExitStatus {
        let mut p = self.agents[i].proc.take().expect("agent running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("SIGTERM");
        p.child.wait().expect("agent exit")
    }

    /// kill -9 of everything on agent `i`'s host: agent, shims, containers.
    pub fn kill_host(&mut self, i: usize) {
        self.agents[i].host.kill();
        if let Some(mut p) = self.agents[i].proc.take() {
            p.kill9(); // reaps it
        }
    }

    pub fn http(&self) -> reqwest::blocking::Client {
        let mut http = reqwest::blocking::Client::builder().timeout(Duration::from_secs(10));
        if let Some(ca) = self.ca_file() {
            let pem = std::fs::read(ca).expect("cluster CA");
            http = http.tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("CA")]);
        }
        http.build().expect("http client")
    }

    /// The API's URL for `path` (`/v1/nodes`).
    pub fn url(&self, path: &str) -> String {
        match self.api.starts_with("https://") {
            true => format!("{}{path}", self.api),
            false => format!("http://{}{path}", self.api),
        }
    }

    /// The cluster CA's certificate, which the API's is issued by when `api_tls`.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.spec
            .api_tls
            .then(|| self.dir.path().join("coordinator/ca/ca.pem"))
    }

    /// `GET /v1/nodes`.
    pub fn nodes(&self) -> Vec<Value> {
        let v: Value = self
            .http()
            .get(self.url("/v1/nodes"))
            .bearer_auth(&self.admin)
            .send()
            .expect("nodes")
            .json()
            .expect("json");
        v.as_array().cloned().unwrap_or_default()
    }

    /// Polls `GET /v1/nodes` until `ok` holds; returns the nodes then.
    pub fn wait_nodes(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let mut last = Vec::new();
        let started = Instant::now();
        let found = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_until(what, timeout, || {
                last = self.nodes();
                ok(&last).then(|| last.clone())
            })
        }));
        match found {
            Ok(nodes) => {
                eprintln!("{what}: after {:?}", started.elapsed());
                nodes
            }
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; nodes: {}",
                serde_json::to_string_pretty(&last).unwrap_or_default()
            ),
        }
    }

    /// Waits until node `name` is in `state`; returns how long it took.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Duration {
        let started = Instant::now();
        self.wait_nodes(&format!("{name} {state}"), timeout, |n| {
            state_of(n, name) == Some(state)
        });
        started.elapsed()
    }

    /// `POST /v1/jobs` as the admin; returns the job.
    pub fn submit(&self, spec: Value) -> Value {
        let r = self
            .http()
            .post(self.url("/v1/jobs"))
            .bearer_auth(&self.admin)
            .json(&spec)
            .send()
            .expect("submit");
        let status = r.status();
        let body: Value = r.json().expect("json");
        assert!(status.is_success(), "submit: {status} {body}");
        body
    }

    pub fn job(&self, id: &str) -> Value {
        self.http()
            .get(self.url(&format!("/v1/jobs/{id}")))
            .bearer_auth(&self.admin)
            .send()
            .expect("job")
            .json()
            .expect("json")
    }

    /// Waits until job `id` is in one of `states`.
    pub fn wait_job(&self, id: &str, states: &[&str], timeout: Duration) -> Value {
        wait_until(&format!("job {id} in {states:?}"), timeout, || {
            let j = self.job(id);
            states.iter().any(|s| j["state"] == *s).then_some(j)
        })
    }

    /// The job's output (stdout and stderr).
    pub fn logs(&self, id: &str) -> String {
        self.http()
            .get(self.url(&format!("/v1/jobs/{id}/logs")))
            .bearer_auth(&self.admin)
            .send()
            .expect("logs")
            .text()
            .expect("text")
    }

    /// The `gantry` CLI against this cluster.
    /// Deploys `manifest` (TOML) with `gantry deploy -f`; panics with its stderr if that
    /// fails.
    pub fn deploy(&self, manifest: &str) {
        let file = self.dir.path().join("gantry.toml");
        std::fs::write(&file, manifest).expect("write manifest");
        let out = self.gantry(&["deploy", "-f", file.to_str().expect("utf-8")]);
        assert!(
            out.status.success(),
            "deploy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The app view's entry for `function` of `app` (every version's, the newest first
    /// found), or null.
    pub fn function_view(&self, app: &str, function: &str) -> Value {
        let v: Value = self
            .http()
            .get(self.url(&format!("/v1/apps/{app}")))
            .bearer_auth(&self.admin)
            .send()
            .expect("app")
            .json()
            .expect("json");
        v["functions"]
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == function).cloned())
            .unwrap_or(Value::Null)
    }

    pub fn gantry(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(binary("gantry"));
        if let Some(ca) = self.ca_file() {
            cmd.env("GANTRY_CA", ca);
        }
        cmd.env("GANTRY_ADDR", &self.api)
            .env("GANTRY_TOKEN", &self.admin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("gantry")
    }

    /// The coordinator's control address.
    pub fn control_addr(&self) -> SocketAddr {
        self.control.parse().expect("control address")
    }
}

/// `gantry-coordinator serve` on `dir`'s `coordinator` state and `coordinator.toml`, with
/// the given listen addresses.
fn coordinator_command(
    dir: &std::path::Path,
    [api, ingress]: [&str; 2],
    control: &str,
    gossip: &str,
) -> Command {
    let mut cmd = Command::new(binary("gantry-coordinator"));
    cmd.env("GANTRY_CONFIG", dir.join("coordinator.toml"))
        .args(["serve", "--state-dir"])
        .arg(dir.join("coordinator"))
        .args(["--api-listen", api])
        .args(["--ingress-listen", ingress])
        .args(["--control-listen", control])
        .args(["--gossip-listen", gossip]);
    cmd
}

/// `<dir>/logs/<name>.log`, opened for appending (a restarted process adds to it).
fn log_file(dir: &std::path::Path, name: &str) -> std::fs::File {
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).expect("logs directory");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(logs.join(format!("{name}.log")))
        .expect("log file")
}

/// A copy of `cmd` (program, arguments, environment).
fn cmd_clone(cmd: &Command) -> Command {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

/// The state of node `name` in a `GET /v1/nodes` answer.
pub fn state_of<'a>(nodes: &'a [Value], name: &str) -> Option<&'a str> {
    node_of(nodes, name).and_then(|n| n["state"].as_str())
}

pub fn node_of<'a>(nodes: &'a [Value], name: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["id"] == name)
}

/// Processes on `host` whose command line is exactly `argv` (a test job's marker, such as
/// `sleep 1000`).
pub fn processes(host: &Host, argv: &[&str]) -> usize {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    host.pids()
        .into_iter()
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .count()
}

/// The containers a function view counts that live (starting, idle, busy or draining).
pub fn live_containers(f: &Value) -> u64 {
    ["starting", "idle", "busy", "draining"]
        .iter()
        .map(|k| f[*k].as_u64().unwrap_or(0))
        .sum()
}
