//! Fixtures for function tests: the example runtimes (`examples/echo-runtime`, built static,
//! and `examples/runtime.sh`) and the WebSocket echo server (`tests/fixtures/ws-echo`, a web
//! endpoint's container), busybox images that carry them, and [`FakeRuntimeApi`], a
//! stand-in for the agent's runtime API that checks a runtime speaks the contract
//! (docs/functions.md) without an agent or a container.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The repository root (this crate is `tests/`).
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the repository root")
        .to_owned()
}

/// The cargo target directory the running executable was built in: the nearest ancestor with
/// cargo's `CACHEDIR.TAG` (`target/debug/deps/x` → `target`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    exe.ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
        .map(Path::to_owned)
        .unwrap_or_else(|| repo().join("target"))
}

/// `examples/echo-runtime`, built static (`+crt-static`, so it runs in busybox or scratch) into
/// `<target>/echo-runtime` once per process (see [`build_static`]). Returns the binary's path.
pub fn echo_runtime() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| build_static("examples/echo-runtime", "echo-runtime"))
        .clone()
}

/// `tests/fixtures/ws-echo`, a WebSocket echo server on `$PORT`, built static into
/// `<target>/ws-echo` once per process (see [`build_static`]). Returns the binary's path.
pub fn ws_echo() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| build_static("tests/fixtures/ws-echo", "ws-echo"))
        .clone()
}

/// Builds binary `name` of the crate at `crate_dir` (relative to the repository root; its own
/// workspace) static, with `+crt-static` so it runs in busybox or scratch, into
/// `<target>/<name>`; cargo's lock makes concurrent test processes safe and a rebuild of an
/// unchanged tree is a no-op. Returns the binary's path.
fn build_static(crate_dir: &str, name: &str) -> PathBuf {
    const TRIPLE: &str = "x86_64-unknown-linux-gnu";
    let manifest = repo().join(crate_dir).join("Cargo.toml");
    let target = target_dir().join(name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // What the outer cargo set for this build (its target dir, flags, package variables,
    // jobserver) would redirect or break the nested one; the cargo home and toolchain stay.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let cargo_var = key.starts_with("CARGO_") && key != "CARGO_HOME";
        let other = ["RUSTFLAGS", "RUSTDOCFLAGS", "MAKEFLAGS", "MFLAGS"].contains(&&*key);
        if cargo_var || other || key.starts_with("__CARGO") {
            cmd.env_remove(&*key);
        }
    }
    let out = cmd
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args(["build", "--release", "--manifest-path"])
        .arg(&manifest)
        .args(["--bin", name, "--target", TRIPLE, "--target-dir"])
        .arg(&target)
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build {crate_dir}: {e}"));
    assert!(
        out.status.success(),
        "building {crate_dir} statically failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target.join(TRIPLE).join("release").join(name);
    assert!(bin.is_file(), "cargo built no {}", bin.display());
    bin
}

/// `examples/runtime.sh`, the shell runtime (needs curl where it runs).
pub fn runtime_sh() -> PathBuf {
    repo().join("examples/runtime.sh")
}

/// Whether `curl` is on this host's PATH (runtime.sh needs it).
pub fn have_curl() -> bool {
    Command::new("curl")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds at `dir` the busybox root filesystem of [`crate::busybox_rootfs`] plus the example
/// runtimes: `/app/runtime` (the static echo runtime) and `/app/runtime.sh` (busybox has no
/// curl: it only runs in images that add one), and `/run/gantry` for the runtime API's
/// socket. Import it on an agent with [`import_echo`] (image `echo`), or make an OCI layout of
/// it for a registry with [`oci_layout`]; deploy with `command = ["/app/runtime"]`.
pub fn echo_rootfs(dir: &Path) {
    crate::busybox_rootfs(dir);
    let app = dir.join("app");
    std::fs::create_dir_all(&app).expect("mkdir /app");
    std::fs::create_dir_all(dir.join("run/gantry")).expect("mkdir /run/gantry");
    for (from, to) in [(echo_runtime(), "runtime"), (runtime_sh(), "runtime.sh")] {
        std::fs::copy(&from, app.join(to))
            .unwrap_or_else(|e| panic!("copying {} into the rootfs: {e}", from.display()));
    }
}

/// Runs `agent` (a `gantry-agent` command with its state directory set) as
/// `image import ROOTFS --name echo --cmd /app/runtime`.
pub fn import_echo(agent: Command, rootfs: &Path) {
    import_image(agent, rootfs, "echo", &["/app/runtime"]);
}

/// Builds at `dir` the busybox root filesystem of [`crate::busybox_rootfs`] plus
/// `/app/ws-echo` (the static [`ws_echo`] server). Import it on an agent with
/// [`import_ws_echo`] (image `ws-echo`); deploy as a web endpoint with
/// `command = ["/app/ws-echo"]`.
pub fn ws_echo_rootfs(dir: &Path) {
    crate::busybox_rootfs(dir);
    let app = dir.join("app");
    std::fs::create_dir_all(&app).expect("mkdir /app");
    let bin = ws_echo();
    std::fs::copy(&bin, app.join("ws-echo"))
        .unwrap_or_else(|e| panic!("copying {} into the rootfs: {e}", bin.display()));
}

/// Runs `agent` (a `gantry-agent` command with its state directory set) as
/// `image import ROOTFS --name ws-echo --cmd /app/ws-echo`.
pub fn import_ws_echo(agent: Command, rootfs: &Path) {
    import_image(agent, rootfs, "ws-echo", &["/app/ws-echo"]);
}

/// Runs `agent` (a `gantry-agent` command with its state directory set) as `image import
/// ROOTFS --name NAME` with `cmd` as the image's default command.
pub fn import_image(mut agent: Command, rootfs: &Path, name: &str, cmd: &[&str]) {
    agent
        .args(["image", "import"])
        .arg(rootfs)
        .args(["--name", name]);
    for part in cmd {
        agent.arg(format!("--cmd={part}"));
    }
    let out = agent.output().expect("gantry-agent image import");
    assert!(
        out.status.success(),
        "image import {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A one-layer OCI image layout of `rootfs` at `<dir>/layout`, tag `v1`, default command
/// `cmd`, built with umoci; `skopeo copy oci:<layout>:v1 docker://<api>/team/echo:v1` pushes
/// it into the embedded registry. Returns the layout's path.
pub fn oci_layout(rootfs: &Path, dir: &Path, cmd: &[&str]) -> PathBuf {
    let layout = dir.join("layout");
    let bundle = dir.join("bundle");
    let image = format!("{}:v1", layout.display());
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("spawn umoci/cp");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    run(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", rootfs.display()))
        .arg(bundle.join("rootfs")));
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    let mut config = Command::new("umoci");
    config.arg("config");
    for part in cmd {
        config.arg(format!("--config.cmd={part}"));
    }
    run(config.args(["--image", &image]));
    layout
}

/// One request a runtime made to [`FakeRuntimeApi`].
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// What [`FakeRuntimeApi`] knows; behind one lock.
#[derive(Default)]
struct FakeState {
    /// Inputs not handed out yet: (index, content type, body); input `i` has id `in-i`.
    queue: std::collections::VecDeque<(usize, String, Vec<u8>)>,
    /// Handed out and not answered.
    held: Vec<String>,
    requests: Vec<Recorded>,
    /// `next` requests waiting right now, and the most seen at once.
    waiting: usize,
    max_waiting: usize,
    too_many: usize,
}

/// A stand-in for the agent's runtime API on a unix socket: answers `ready`, hands out its
/// inputs to `next` (the first only once `gate` `next` calls wait at once, which proves a
/// runtime's concurrency without timing; `429` when held inputs plus waiting `next` calls
/// reach `max_inputs`), answers `response`/`error` 202 for held inputs and 404 otherwise,
/// and `410 Gone` once its inputs are all handed out. Every request is recorded. Headers go
/// out lower-cased and odd-numbered inputs chunked, as hyper may send them.
pub struct FakeRuntimeApi {
    pub socket: PathBuf,
    state: Arc<(Mutex<FakeState>, Condvar)>,
}

impl FakeRuntimeApi {
    /// Serves at `<dir>/runtime.sock`; `inputs` are (content type, body) and get ids `in-0`…
    pub fn start(dir: &Path, inputs: &[(&str, &[u8])], max_inputs: usize, gate: usize) -> Self {
        let socket = dir.join("runtime.sock");
        let listener = UnixListener::bind(&socket).expect("bind the fake runtime API");
        let mut state = FakeState::default();
        for (i, (ct, body)) in inputs.iter().enumerate() {
            state.queue.push_back((i, (*ct).to_owned(), body.to_vec()));
        }
        let state = Arc::new((Mutex::new(state), Condvar::new()));
        let shared = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(conn, &state, max_inputs, gate));
            }
        });
        Self { socket, state }
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// The requests to `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        let all = self.requests();
        all.into_iter().filter(|r| r.path == path).collect()
    }

    /// The most `next` calls that waited at once.
    pub fn max_waiting(&self) -> usize {
        self.lock().max_waiting
    }

    /// How many `next` calls got `429` (the runtime held `max_inputs` already).
    pub fn too_many(&self) -> usize {
        self.lock().too_many
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.0.lock().expect("fake runtime API state")
    }
}

/// One connection: one request, one response, close.
fn serve(conn: UnixStream, state: &(Mutex<FakeState>, Condvar), max_inputs: usize, gate: usize) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone the connection"));
    let Some(req) = read_request(&mut reader) else {
        return;
    };
    let (lock, cond) = state;
    let mut s = lock.lock().expect("fake runtime API state");
    s.requests.push(req.clone());
    let (status, headers, body, chunked): (u16, Vec<(String, String)>, Vec<u8>, bool) =
        match (req.method.as_str(), req.path.as_str()) {
            ("POST", "/v1/ready") => (204, vec![], vec![], false),
            ("POST", "/v1/init/error") => (202, vec![], vec![], false),
            ("GET", "/v1/events") => (204, vec![], vec![], false),
            // Waiting `next` calls count against max_inputs too, as in the agent.
            ("GET", "/v1/inputs/next") if s.held.len() + s.waiting >= max_inputs => {
                s.too_many += 1;
                (429, vec![], b"already holds max_inputs".to_vec(), false)
            }
            ("GET", "/v1/inputs/next") => {
                s.waiting += 1;
                s.max_waiting = s.max_waiting.max(s.waiting);
                cond.notify_all();
                let deadline = Instant::now() + Duration::from_secs(10);
                while s.gate_closed(gate) && Instant::now() < deadline {
                    s = cond
                        .wait_timeout(s, Duration::from_millis(50))
                        .expect("fake runtime API state")
                        .0;
                }
                s.waiting -= 1;
                match s.queue.pop_front() {
                    Some((n, ct, body)) => {
                        let id = format!("in-{n}");
                        s.held.push(id.clone());
                        let deadline_ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() + 60_000)
                            .unwrap_or(0);
                        let headers = vec![
                            ("gantry-input-id".into(), id),
                            ("gantry-call-id".into(), "fc-0000000000000001".into()),
                            ("gantry-attempt".into(), "1".into()),
                            ("gantry-deadline-ms".into(), deadline_ms.to_string()),
                            ("content-type".into(), ct),
                        ];
                        (200, headers, body, n % 2 == 1)
                    }
                    None => (410, vec![], b"draining".to_vec(), false),
                }
            }
            ("POST", path) => {
                let id = path
                    .strip_prefix("/v1/inputs/")
                    .and_then(|p| p.strip_suffix("/response").or(p.strip_suffix("/error")));
                match id.and_then(|id| s.held.iter().position(|h| h == id)) {
                    Some(i) => {
                        s.held.remove(i);
                        (202, vec![], vec![], false)
                    }
                    None => (404, vec![], b"input not held".to_vec(), false),
                }
            }
            _ => (404, vec![], b"no such endpoint".to_vec(), false),
        };
    drop(s);
    let _ = write_response(conn, status, &headers, &body, chunked);
}

impl FakeState {
    /// True while the first input still waits for `gate` concurrent `next` calls.
    fn gate_closed(&self, gate: usize) -> bool {
        let first = self.queue.front().is_some_and(|(n, _, _)| *n == 0);
        first && self.waiting < gate
    }
}

fn read_request(reader: &mut BufReader<UnixStream>) -> Option<Recorded> {
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_owned(), parts.next()?.to_owned());
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line).ok()?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body).ok()?;
    Some(Recorded {
        method,
        path,
        headers,
        body,
    })
}

fn write_response(
    mut conn: UnixStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    chunked: bool,
) -> std::io::Result<()> {
    let mut out = format!("HTTP/1.1 {status} X\r\nconnection: close\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    let bytes = if chunked {
        out.push_str("transfer-encoding: chunked\r\n\r\n");
        let mut b = out.into_bytes();
        // Two chunks, to exercise the decoding.
        let (a, z) = body.split_at(body.len() / 2);
        for part in [a, z] {
            if !part.is_empty() {
                b.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                b.extend_from_slice(part);
                b.extend_from_slice(b"\r\n");
            }
        }
        b.extend_from_slice(b"0\r\n\r\n");
        b
    } else {
        out.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut b = out.into_bytes();
        b.extend_from_slice(body);
        b
    };
    conn.write_all(&bytes)?;
    conn.flush()
}

/// Waits up to `timeout` for `child` to exit; kills it and panics if it does not.
pub fn wait_exit(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for the runtime") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the runtime did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
