//! gantry-tests: end-to-end tests across real processes, and the helpers they share.
//! The multi-host harness: [`netns`] makes test hosts (network namespaces on a bridge), runs
//! processes in them, does faults to them and cleans up after them; [`cluster`] starts a
//! coordinator and agents on such hosts. [`function_sim`] runs the coordinator's functions
//! layer against fake agents in one process on a virtual clock.

pub mod cluster;
pub mod dev;
pub mod function_sim;
pub mod functions_fixture;
pub mod netns;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};

/// A workspace binary (`gantry-agent`, `gantry-coordinator`, `gantry`), from the same
/// target directory as the running executable: beside it (a binary such as
/// `gantry-bench`), or one level up (a test, in `target/<profile>/deps/`).
/// `cargo nextest run --workspace` builds them (each binary's own package has integration
/// tests, which is what makes cargo build it).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let beside = exe.parent().expect("executable directory");
    let candidates = [beside.join(name), beside.join("..").join(name)];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "{} is missing; build the workspace first (`cargo nextest run --workspace` does)",
                candidates[1].display()
            )
        })
}

/// A process killed (SIGKILL) and reaped when dropped, so a failing test leaves nothing.
pub struct Proc {
    pub child: Child,
    pub stdout: BufReader<ChildStdout>,
}

impl Proc {
    /// Starts `cmd` with stdout piped.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Self { child, stdout }
    }

    /// Reads stdout lines until one starts with `prefix`; returns the rest of that line.
    pub fn line_after(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self.stdout.read_line(&mut line).expect("read stdout");
            assert!(n > 0, "process exited before printing `{prefix}`");
            if let Some(rest) = line.trim_end().strip_prefix(prefix) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Reads stdout lines up to and including the one starting with `prefix`.
    pub fn lines_until(&mut self, prefix: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).expect("read stdout");
            assert!(
                n > 0,
                "process exited before printing `{prefix}`; it printed {lines:?}"
            );
            let line = line.trim_end().to_owned();
            let done = line.starts_with(prefix);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds a busybox root filesystem at `dir` (bench/make-busybox-rootfs; needs
/// busybox-static).
pub fn busybox_rootfs(dir: &std::path::Path) {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/make-busybox-rootfs");
    let ok = Command::new(script)
        .arg(dir)
        .status()
        .expect("rootfs script");
    assert!(
        ok.success(),
        "making the busybox rootfs at {}",
        dir.display()
    );
}

/// Runs `agent` (a `gantry-agent` command with its state directory set) as
/// `image import ROOTFS --name busybox`.
pub fn import_busybox(mut agent: Command, rootfs: &std::path::Path) {
    let out = agent
        .args(["image", "import"])
        .arg(rootfs)
        .args(["--name", "busybox"])
        .output()
        .expect("image import");
    assert!(
        out.status.success(),
        "image import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Loopback addresses free right now: a TCP one (the API) and a UDP one (QUIC control).
/// Fixed ports let a restarted coordinator be where its agent looks for it.
pub fn free_ports() -> (String, String) {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("tcp");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    (
        tcp.local_addr().expect("addr").to_string(),
        udp.local_addr().expect("addr").to_string(),
    )
}

/// The rest of the first line in `lines` that starts with `prefix`.
pub fn field(lines: &[String], prefix: &str) -> Option<String> {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|r| r.trim().to_owned())
}

/// A started `gantry-coordinator serve`: its process and what it printed.
pub struct Coordinator {
    pub proc: Proc,
    pub api: String,
    pub control: String,
    /// Printed on the first start only.
    pub admin: Option<String>,
}

impl Coordinator {
    pub fn start(state: &std::path::Path, api: &str, control: &str) -> Self {
        let mut cmd = Command::new(binary("gantry-coordinator"));
        cmd.args([
            "serve",
            "--gossip-listen",
            "127.0.0.1:0",
            "--api-listen",
            api,
            "--ingress-listen",
            "127.0.0.1:0",
            "--control-listen",
            control,
            "--state-dir",
        ])
        .arg(state);
        let mut proc = Proc::spawn(cmd);
        let lines = proc.lines_until("control listening on");
        let get = |p| field(&lines, p);
        Self {
            api: get("api listening on").expect("api address"),
            control: get("control listening on").expect("control address"),
            admin: get("admin token (shown once, store it safely):"),
            proc,
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}
