//! `gantry dev` and the `gantry` CLI as a user runs them: one command starts a coordinator
//! and an agent; `gantry run` returns the job's exit code; `--output json` is parseable;
//! SIGTERM stops everything.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use gantry_tests::{Proc, binary, free_ports};

fn gantry(home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary("gantry"))
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("GANTRY_ADDR")
        .env_remove("GANTRY_TOKEN")
        .args(args)
        .output()
        .expect("gantry")
}

#[test]
fn gantry_dev_runs_jobs_through_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let state = dir.path().join("dev");
    // The dev agent's image store gets busybox before the agent starts (it holds the store).
    let rootfs = dir.path().join("rootfs");
    gantry_tests::busybox_rootfs(&rootfs);
    let mut agent = Command::new(binary("gantry-agent"));
    agent.env("GANTRY_STATE_DIR", state.join("agent"));
    agent.env("GANTRY_CONFIG", state.join("agent/agent.toml"));
    gantry_tests::import_busybox(agent, &rootfs);

    // Without a cluster the CLI says what to do.
    let none = gantry(&home, &["jobs", "list"]);
    assert!(!none.status.success());
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("gantry dev"),
        "{}",
        String::from_utf8_lossy(&none.stderr)
    );

    let (api, control) = free_ports();
    // A production configuration in the environment (here: TLS on the API) is not the dev
    // cluster's: it stays plain HTTP on loopback.
    let production = dir.path().join("coordinator.toml");
    std::fs::write(&production, "[api]\ntls_names = [\"127.0.0.1\"]\n").expect("config");
    let mut cmd = Command::new(binary("gantry"));
    cmd.env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .env("GANTRY_CONFIG", &production)
        .args([
            "dev",
            "--node",
            "dev-test",
            "--api-listen",
            &api,
            "--control-listen",
            &control,
            "--state-dir",
        ])
        .arg(&state);
    let mut dev = Proc::spawn(cmd);
    dev.line_after("gantry dev is running");

    let run = gantry(
        &home,
        &[
            "run",
            "--image",
            "busybox",
            "--cpus",
            "0.5",
            "--memory",
            "64M",
            "--",
            "sh",
            "-c",
            "echo hello-from-the-job; sleep 0.3; echo second-line; exit 4",
        ],
    );
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "hello-from-the-job\nsecond-line\n",
        "the job's output streams to stdout"
    );
    assert_eq!(
        run.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ok = gantry(&home, &["run", "--image", "busybox", "--", "true"]);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let list = gantry(&home, &["--output", "json", "jobs", "list"]);
    let jobs: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json job list");
    assert_eq!(jobs.as_array().map(Vec::len), Some(2), "{jobs}");
    assert_eq!(jobs[0]["state"], "failed");
    assert_eq!(jobs[1]["state"], "succeeded");
    let first = jobs[0]["id"].as_str().expect("id");
    let failed = gantry(
        &home,
        &["--output", "json", "jobs", "list", "--state", "failed"],
    );
    let failed: serde_json::Value = serde_json::from_slice(&failed.stdout).expect("json job list");
    assert_eq!(failed.as_array().map(Vec::len), Some(1), "{failed}");
    assert_eq!(failed[0]["id"].as_str(), Some(first));
    // A reader that goes away early ends the CLI quietly, as with any Unix tool: killed
    // by SIGPIPE (141 in a shell), no panic. The reader closes its end before the CLI
    // has its answer from the coordinator, so the CLI's first write meets a closed pipe.
    let piped = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} jobs list | {{ exec <&-; sleep 0.5; }}; echo ${{PIPESTATUS[0]}}",
            binary("gantry").display()
        ))
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("GANTRY_ADDR")
        .env_remove("GANTRY_TOKEN")
        .output()
        .expect("bash");
    let stderr = String::from_utf8_lossy(&piped.stderr);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&piped.stdout), "141\n", "{stderr}");
    let logs = gantry(&home, &["logs", first]);
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout),
        "hello-from-the-job\nsecond-line\n",
        "{}",
        String::from_utf8_lossy(&logs.stderr)
    );
    let rank0 = gantry(&home, &["logs", first, "--rank", "0"]);
    assert_eq!(
        String::from_utf8_lossy(&rank0.stdout),
        "hello-from-the-job\nsecond-line\n"
    );
    let rank1 = gantry(&home, &["logs", first, "--rank", "1"]);
    assert!(!rank1.status.success(), "a job of one member has no rank 1");
    let missing = gantry(&home, &["logs", "j-ffffffffffffffff"]);
    assert!(!missing.status.success());
    // An image pushed to the embedded registry runs by its short name.
    let rootfs_arg = rootfs.to_str().expect("utf8").to_owned();
    let pushed = gantry(
        &home,
        &[
            "image",
            "import",
            &rootfs_arg,
            "--name",
            "tools:v1",
            "--cmd",
            "sh",
            "--cmd",
            "-c",
            "--cmd",
            "echo from-the-registry",
        ],
    );
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let images = gantry(&home, &["image", "list"]);
    assert!(
        String::from_utf8_lossy(&images.stdout).contains("tools:v1"),
        "{}",
        String::from_utf8_lossy(&images.stdout)
    );
    let from_registry = gantry(&home, &["run", "--image", "tools:v1"]);
    assert_eq!(
        from_registry.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&from_registry.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&from_registry.stdout),
        "from-the-registry\n"
    );
    let nodes = gantry(&home, &["nodes", "list"]);
    assert!(
        String::from_utf8_lossy(&nodes.stdout).contains("dev-test"),
        "{}",
        String::from_utf8_lossy(&nodes.stdout)
    );
    let bad = gantry(
        &home,
        &["run", "--image", "busybox", "--memory", "0", "--", "true"],
    );
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("resources.memory"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // SIGTERM stops gantry dev and its children.
    nix_kill(dev.child.id() as i32);
    let status = wait_exit(&mut dev.child, Duration::from_secs(20)).expect("gantry dev stops");
    assert!(status.success(), "{status:?}");
}

fn nix_kill(pid: i32) {
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill")
            .success()
    );
}

fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The README's main-job command: `gantry dev --demo ROOTFS` runs a job through the whole
/// path and exits with its code.
#[test]
fn gantry_dev_demo_runs_a_job_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    gantry_tests::busybox_rootfs(&rootfs);
    let (api, control) = free_ports();
    let out = Command::new(binary("gantry"))
        .env("HOME", dir.path().join("home"))
        .env_remove("XDG_CONFIG_HOME")
        .args([
            "dev",
            "--api-listen",
            &api,
            "--control-listen",
            &control,
            "--demo",
        ])
        .arg(&rootfs)
        .arg("--state-dir")
        .arg(dir.path().join("dev"))
        .output()
        .expect("gantry dev --demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("hello from a Gantry job on j-"), "{stdout}");
    assert!(stdout.contains("demo job exited with 0"), "{stdout}");
}

#[test]
fn gantry_dev_runs_several_agents_with_simulated_gpus() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let state = dir.path().join("dev");
    let (api, control) = free_ports();
    let mut cmd = Command::new(binary("gantry"));
    cmd.env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .args([
            "dev",
            "--agents",
            "3",
            "--simulate-gpus",
            "4xH100-80GB,nvlink=2",
            "--api-listen",
            &api,
            "--control-listen",
            &control,
            "--state-dir",
        ])
        .arg(&state);
    let mut dev = Proc::spawn(cmd);
    let line = dev.line_after("gantry dev is running");
    assert!(line.contains("3 agent(s) with simulated GPUs"), "{line}");
    assert!(line.contains("web endpoints at http://"), "{line}");
    let nodes = gantry_tests::netns::wait_until(
        "three ready nodes with 4 simulated GPUs",
        Duration::from_secs(30),
        || {
            let out = gantry(&home, &["--output", "json", "nodes", "list"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let nodes = v.as_array()?.clone();
            (nodes.len() == 3
                && nodes.iter().all(|n| {
                    n["state"] == "ready"
                        && n["gpus"].as_array().is_some_and(|g| {
                            g.len() == 4 && g.iter().all(|g| g["simulated"] == true)
                        })
                }))
            .then_some(nodes)
        },
    );
    let ids: Vec<&str> = nodes.iter().filter_map(|n| n["id"].as_str()).collect();
    assert_eq!(ids, ["dev-node", "dev-node-2", "dev-node-3"]);
    assert_eq!(nodes[0]["gpus"][3]["nvlink_group"], 1);
    // Each agent has its own state directory.
    for d in ["agent", "agent-2", "agent-3"] {
        assert!(state.join(d).join("identity").is_dir(), "{d}");
    }
    let pid = dev.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill")
            .success()
    );
    let status =
        gantry_tests::netns::wait_until("gantry dev to stop", Duration::from_secs(30), || {
            dev.child.try_wait().expect("wait")
        });
    assert!(status.success(), "{status:?}");
}

/// `gantry dev --demo` on a terminal (a pseudo-terminal from `script`), with and without
/// `--verbose`: the command line for `script -c`.
fn dev_demo_on_a_terminal(dir: &Path, rootfs: &Path, verbose: bool) -> String {
    let (api, control) = free_ports();
    let state = dir.join(if verbose { "dev-verbose" } else { "dev-quiet" });
    let quote = |p: &Path| format!("'{}'", p.display());
    let line = format!(
        "{} dev --api-listen {api} --control-listen {control} --demo {} --state-dir {}{}",
        quote(&binary("gantry")),
        quote(rootfs),
        quote(&state),
        if verbose { " --verbose" } else { "" }
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .env("HOME", dir.join("home"))
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("GANTRY_LOG")
        .output()
        .expect("script (util-linux) runs gantry dev on a pseudo-terminal");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("demo job exited with 0"), "{text}");
    text
}

#[test]
fn gantry_dev_on_a_terminal_shows_only_its_childrens_warnings_as_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    gantry_tests::busybox_rootfs(&rootfs);
    let quiet = dev_demo_on_a_terminal(dir.path(), &rootfs, false);
    assert!(
        !quiet.contains("\"level\":"),
        "no JSON on a terminal:\n{quiet}"
    );
    assert!(
        !quiet.contains("INFO"),
        "only warnings and errors from the children:\n{quiet}"
    );
    let verbose = dev_demo_on_a_terminal(dir.path(), &rootfs, true);
    assert!(!verbose.contains("\"level\":"), "{verbose}");
    assert!(
        verbose.contains("INFO") && verbose.contains("coordinator serving"),
        "--verbose shows the children's info lines as text:\n{verbose}"
    );
}

/// `gantry run FILE.py…` (and `deploy`, `serve`) replace the CLI with the Python SDK:
/// `$GANTRY_PYTHON -m gantry run FILE.py… ARGS…`, its exit status the command's.
#[test]
fn python_apps_are_handed_to_the_sdk() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let python = dir.path().join("python");
    std::fs::write(&python, "#!/bin/sh\necho \"python $*\"\nexit 3\n").expect("script");
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let sdk = |args: &[&str], python: &Path| {
        Command::new(binary("gantry"))
            .env("HOME", dir.path())
            .env("GANTRY_PYTHON", python)
            .args(args)
            .output()
            .expect("gantry")
    };
    let out = sdk(&["run", "app.py::f", "x", "--flag"], &python);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "python -m gantry run app.py::f x --flag\n"
    );
    assert_eq!(out.status.code(), Some(3), "the SDK's exit status");
    for (args, want) in [
        (
            &["deploy", "app.py"][..],
            "python -m gantry deploy app.py\n",
        ),
        (
            &["serve", "dir/app.py"][..],
            "python -m gantry serve dir/app.py\n",
        ),
    ] {
        assert_eq!(String::from_utf8_lossy(&sdk(args, &python).stdout), want);
    }
    // A missing interpreter is named.
    let out = sdk(&["run", "app.py"], &dir.path().join("no-such-python"));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("GANTRY_PYTHON") && err.contains("no-such-python"),
        "{err}"
    );
    // The CLI's own commands are untouched.
    let out = sdk(&["deploy", "-f", "missing.toml"], &python);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("python"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
    let help = sdk(&["--help"], &python);
    assert!(String::from_utf8_lossy(&help.stdout).contains("gantry run FILE.py[::FUNCTION]"));
}
