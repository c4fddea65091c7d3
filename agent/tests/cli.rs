//! The operator commands as a user runs them, and surviving `kill -9` of the agent
//! process: containers keep running under their shims and are re-adopted.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{AGENT, eventually, leftovers};
use gantry_agent::runtime::{ShimPid, files};
use gantry_shared::ContainerId;

fn agent(state: &Path, args: &[&str]) -> Output {
    Command::new(AGENT)
        .env("GANTRY_STATE_DIR", state)
        .args(args)
        .output()
        .expect("run gantry-agent")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = common::busybox_rootfs(dir.path());
    let state = dir.path().join("state");
    let out = agent(
        &state,
        &[
            "image",
            "import",
            rootfs.to_str().expect("utf8"),
            "--name",
            "busybox",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    dir
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn run_prints_output_and_exits_with_the_container_code() {
    let dir = setup();
    let state = dir.path().join("state");
    let out = agent(
        &state,
        &[
            "run",
            "--image",
            "busybox",
            "--memory",
            "64M",
            "--cpus",
            "0.5",
            "-e",
            "WHO=world",
            "--",
            "sh",
            "-c",
            "echo hello $WHO; echo oops >&2; exit 42",
        ],
    );
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(text(&out.stdout), "hello world\n");
    assert!(text(&out.stderr).contains("oops"));
    // Killed by a signal (here SIGKILL at a timeout without grace): 128 + signal.
    let out = agent(
        &state,
        &[
            "run",
            "--image",
            "busybox",
            "--timeout",
            "300ms",
            "--stop-grace",
            "0s",
            "--",
            "sleep",
            "100",
        ],
    );
    assert_eq!(out.status.code(), Some(137));
    // The foreground run removes its container afterwards.
    let ps = agent(&state, &["ps"]);
    assert_eq!(
        text(&ps.stdout).lines().count(),
        1,
        "only the header: {}",
        text(&ps.stdout)
    );
}

/// Processes whose command line mentions `marker`: a `run` and the shim it forked (which
/// keeps the command line it was forked with).
fn processes_mentioning(marker: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(marker) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// The one-shot path end to end: a real container from a forked shim, its output and
/// code, and nothing left once the command returns (mount, cgroup, libcontainer state,
/// container directory, the shim). A run that fails before its start leaves no shim
/// waiting either.
#[tokio::test(flavor = "multi_thread")]
async fn a_foreground_run_leaves_nothing_behind() {
    let dir = setup();
    let state = dir.path().join("state");
    let out = agent(
        &state,
        &[
            "run",
            "--name",
            "oneshot-leak-check",
            "--image",
            "busybox",
            "--",
            "sh",
            "-c",
            "cat /proc/self/cgroup | grep -c oneshot-leak-check; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_ne!(
        text(&out.stdout).trim(),
        "0",
        "the container ran in its cgroup"
    );
    let id = ContainerId::new("oneshot-leak-check").expect("id");
    assert_eq!(
        leftovers(&state, std::slice::from_ref(&id)),
        Vec::<String>::new()
    );
    assert!(!state.join("containers/oneshot-leak-check").exists());
    assert_eq!(
        processes_mentioning("oneshot-leak-check"),
        Vec::<i32>::new()
    );

    let out = agent(
        &state,
        &[
            "run",
            "--name",
            "oneshot-no-image",
            "--image",
            "nope",
            "--",
            "true",
        ],
    );
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        eventually(Duration::from_secs(5), || processes_mentioning(
            "oneshot-no-image"
        )
        .is_empty())
        .await,
        "the forked shim exits when the run never assigns it: {:?}",
        processes_mentioning("oneshot-no-image")
    );
}

#[test]
fn run_rejects_bad_input_with_a_clear_message() {
    let dir = setup();
    let state = dir.path().join("state");
    let cases: &[(&[&str], &str)] = &[
        (
            &["run", "--image", "nope", "--", "true"],
            "image `nope` is not on this host",
        ),
        (
            &["run", "--image", "busybox", "--memory", "0", "--", "true"],
            "memory limit must be greater than zero",
        ),
        (
            &["run", "--image", "busybox", "--memory=-5M", "--", "true"],
            "is not a positive size",
        ),
        (
            &["run", "--image", "busybox", "--cpus", "0", "--", "true"],
            "cpu limit must be greater than zero",
        ),
        (
            &["run", "--image", "busybox", "--", "does-not-exist"],
            "does not exist in the image",
        ),
        (
            &["image", "import", "/nonexistent/rootfs", "--name", "x"],
            "cannot import /nonexistent/rootfs",
        ),
    ];
    for (args, expect) in cases {
        let out = agent(&state, args);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            text(&out.stderr).contains(expect),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn sigterm_to_a_foreground_run_stops_the_container_gracefully() {
    let dir = setup();
    let state = dir.path().join("state");
    let mut child = Command::new(AGENT)
        .env("GANTRY_STATE_DIR", &state)
        .args([
            "run",
            "--image",
            "busybox",
            "--",
            "sh",
            "-c",
            "trap 'echo bye; exit 9' TERM; echo up; while true; do sleep 0.1; done",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("up"));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("kill");
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("bye"));
    assert_eq!(child.wait().expect("wait").code(), Some(9));
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_survive_kill_9_of_the_agent_and_are_readopted() {
    let dir = setup();
    let state = dir.path().join("state");
    // One container finishes while no agent runs; the other is still running at restart.
    let out = agent(
        &state,
        &[
            "run",
            "--detach",
            "--name",
            "short",
            "--image",
            "busybox",
            "--",
            "sh",
            "-c",
            "sleep 1; echo short-done; exit 4",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut fg = Command::new(AGENT)
        .env("GANTRY_STATE_DIR", &state)
        .args([
            "run",
            "--name",
            "long",
            "--image",
            "busybox",
            "--",
            "sh",
            "-c",
            "echo started; sleep 4; echo finished; exit 5",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(fg.stdout.take().expect("stdout")).lines();
    assert_eq!(
        lines.next().and_then(Result::ok).as_deref(),
        Some("started")
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(fg.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9");
    fg.wait().expect("reap agent");

    let long_dir = state.join("containers/long");
    let shim: ShimPid =
        serde_json::from_slice(&std::fs::read(long_dir.join(files::SHIM_PID)).expect("shim.pid"))
            .expect("json");
    assert!(alive(shim.pid), "the shim outlived the agent");
    let long = ContainerId::new("long").expect("id");
    assert!(
        !gantry_agent::runtime::cgroup::pids(&gantry_agent::runtime::cgroup::container_path(
            &gantry_agent::runtime::cgroup::parent_for(&state),
            "long"
        ))
        .is_empty(),
        "the container kept running"
    );
    assert!(!long_dir.join(files::EXIT).exists());
    // Let `short` exit while no agent is running.
    let short_exit = state.join("containers/short").join(files::EXIT);
    assert!(
        eventually(Duration::from_secs(20), || short_exit.exists()).await,
        "short never exited"
    );

    // A new agent re-adopts both.
    let ps = text(&agent(&state, &["ps"]).stdout);
    let row = |id: &str| {
        ps.lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(row("long").contains("running"), "{ps}");
    assert!(
        row("short").contains("exited") && row("short").trim_end().ends_with('4'),
        "{ps}"
    );

    let wait = agent(&state, &["wait", "long"]);
    assert_eq!(
        wait.status.code(),
        Some(5),
        "exit collected after re-adoption: {}",
        text(&wait.stderr)
    );
    assert!(
        text(&wait.stdout).contains("\"reason\":\"exited\""),
        "{}",
        text(&wait.stdout)
    );
    let logs = agent(&state, &["logs", "long"]);
    assert_eq!(text(&logs.stdout), "started\nfinished\n");
    assert_eq!(agent(&state, &["wait", "short"]).status.code(), Some(4));
    assert_eq!(
        text(&agent(&state, &["logs", "short"]).stdout),
        "short-done\n"
    );

    for id in ["long", "short"] {
        assert!(agent(&state, &["rm", id]).status.success());
    }
    assert!(!alive(shim.pid));
    let short = ContainerId::new("short").expect("id");
    assert_eq!(leftovers(&state, &[long, short]), Vec::<String>::new());
}

#[test]
fn a_lost_shim_is_torn_down_and_reported() {
    let dir = setup();
    let state = dir.path().join("state");
    let out = agent(
        &state,
        &[
            "run", "--detach", "--name", "orphan", "--image", "busybox", "--", "sleep", "1000",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shim: ShimPid = serde_json::from_slice(
        &std::fs::read(state.join("containers/orphan").join(files::SHIM_PID)).expect("shim.pid"),
    )
    .expect("json");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill shim");
    let ps = text(&agent(&state, &["ps"]).stdout);
    assert!(
        ps.lines()
            .any(|l| l.starts_with("orphan") && l.contains("shimlost")),
        "{ps}"
    );
    let id = ContainerId::new("orphan").expect("id");
    assert_eq!(
        leftovers(&state, std::slice::from_ref(&id)),
        Vec::<String>::new(),
        "container torn down after its shim was lost"
    );
}

#[test]
fn a_start_that_was_never_recorded_is_rolled_back() {
    let dir = setup();
    let state = dir.path().join("state");
    let out = agent(
        &state,
        &[
            "run", "--detach", "--name", "unacked", "--image", "busybox", "--", "sleep", "1000",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = ContainerId::new("unacked").expect("id");
    assert!(
        !leftovers(&state, std::slice::from_ref(&id)).is_empty(),
        "running"
    );
    // What an agent crash between spawning the shim and flushing the record leaves behind.
    {
        let store = gantry_agent::store::LocalStore::open(&state.join("db")).expect("store");
        store
            .table("containers")
            .expect("table")
            .remove("unacked")
            .expect("remove record");
    }
    let ps = agent(&state, &["ps"]);
    assert!(ps.status.success(), "{}", text(&ps.stderr));
    assert!(
        !text(&ps.stdout).contains("unacked"),
        "{}",
        text(&ps.stdout)
    );
    assert!(!state.join("containers/unacked").exists());
    assert_eq!(leftovers(&state, &[id]), Vec::<String>::new());
}

#[test]
fn a_run_while_another_agent_holds_the_state_is_refused_and_leaves_nothing() {
    let dir = setup();
    let state = dir.path().join("state");
    // This test process plays the other agent: it holds the state's database.
    let _held = gantry_agent::store::LocalStore::open(&state.join("db")).expect("store");
    let out = agent(
        &state,
        &[
            "run", "--name", "second", "--image", "busybox", "--", "true",
        ],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("--state-dir"),
        "{}",
        text(&out.stderr)
    );
    assert!(!state.join("containers/second").exists(), "nothing left");
}

#[test]
fn a_compressed_rootfs_tarball_imports_and_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = common::busybox_rootfs(dir.path());
    let tarball = dir.path().join("rootfs.tar.gz");
    let tar = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(&rootfs)
        .arg(".")
        .status()
        .expect("tar");
    assert!(tar.success());
    let state = dir.path().join("state");
    let out = agent(
        &state,
        &[
            "image",
            "import",
            tarball.to_str().expect("utf8"),
            "--name",
            "from-tar:v2",
            "--cmd",
            "sh",
            "--cmd",
            "-c",
            "--cmd",
            "echo from tarball",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = agent(&state, &["run", "--image", "from-tar:v2"]);
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    assert_eq!(text(&run.stdout), "from tarball\n");
    let list = text(&agent(&state, &["image", "list"]).stdout);
    assert!(list.contains("from-tar:v2"), "{list}");
}
