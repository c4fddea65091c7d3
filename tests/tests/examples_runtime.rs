//! The example runtimes (examples/echo-runtime, examples/runtime.sh) speak the runtime API
//! contract of docs/functions.md: run as plain host processes against
//! [`FakeRuntimeApi`], they post ready, take inputs (as many at once as GANTRY_MAX_INPUTS),
//! answer outputs and errors in the documented forms, report a failed setup, and exit 0 when
//! drained. The echo runtime runs against the agent's real runtime API too (the same checks,
//! both sides of the contract). Then the busybox image that carries them, and that the static
//! binary runs there.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use gantry_tests::functions_fixture::{
    FakeRuntimeApi, Recorded, echo_rootfs, echo_runtime, have_curl, import_echo, oci_layout,
    runtime_sh, wait_exit,
};

const EXIT_WITHIN: Duration = Duration::from_secs(60);

/// A runtime command with only the environment the contract gives it.
fn runtime_command(program: &[&str], api: &FakeRuntimeApi, max_inputs: usize) -> Command {
    let mut cmd = Command::new(program[0]);
    cmd.args(&program[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GANTRY_RUNTIME_API", &api.socket)
        .env("GANTRY_MAX_INPUTS", max_inputs.to_string())
        .stdin(Stdio::null());
    cmd
}

fn answer(api: &FakeRuntimeApi, id: &str, kind: &str) -> Recorded {
    let path = format!("/v1/inputs/{id}/{kind}");
    let mut found = api.requests_to(&path);
    assert_eq!(found.len(), 1, "one POST {path}; all: {:?}", api.requests());
    found.remove(0)
}

fn assert_output(api: &FakeRuntimeApi, id: &str, content_type: &str, body: &[u8]) {
    let r = answer(api, id, "response");
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some(content_type),
        "{id}"
    );
    assert_eq!(r.body, body, "{id}: {:?}", String::from_utf8_lossy(&r.body));
}

fn assert_error(api: &FakeRuntimeApi, id: &str, kind: &str, message: &str) {
    let r = answer(api, id, "error");
    assert_eq!(
        r.headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    let json: serde_json::Value = serde_json::from_slice(&r.body).expect("error body is JSON");
    assert_eq!(json["type"], kind, "{json}");
    assert_eq!(json["message"], message, "{json}");
    assert!(json["traceback"].is_string(), "{json}");
}

/// The first request is `ready`, and it comes once.
fn assert_ready_first(api: &FakeRuntimeApi) {
    let all = api.requests();
    assert_eq!(
        all.first().map(|r| r.path.as_str()),
        Some("/v1/ready"),
        "{all:?}"
    );
    assert_eq!(api.requests_to("/v1/ready").len(), 1);
}

#[test]
fn echo_runtime_answers_inputs_concurrently_and_exits_0_when_drained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let binary: &[u8] = &[0, 159, 146, 150, b'\r', b'\n'];
    let inputs: &[(&str, &[u8])] = &[
        ("text/plain", b"hello"),
        ("text/plain", br#"fail:boom "quoted" \ done"#),
        ("text/plain", b"sleep:50"),
        ("application/x-custom", binary),
        ("text/plain", b"env:ECHO_TEST_VAR"),
        ("text/plain", b"whoami"),
        ("text/plain", b"env:ECHO_UNSET_VAR"),
    ];
    // The first input waits until 3 `next` calls are outstanding at once.
    let api = FakeRuntimeApi::start(dir.path(), inputs, 3, 3);
    let bin = echo_runtime();
    let mut cmd = runtime_command(&[bin.to_str().expect("utf-8 path")], &api, 3);
    cmd.env("ECHO_TEST_VAR", "from-the-env")
        .env("HOSTNAME", "container-1");
    let status = wait_exit(&mut cmd.spawn().expect("spawn echo-runtime"), EXIT_WITHIN);
    assert_eq!(status.code(), Some(0), "{:?}", api.requests());

    assert_ready_first(&api);
    assert_eq!(
        api.max_waiting(),
        3,
        "GANTRY_MAX_INPUTS=3 means 3 outstanding next calls"
    );
    assert_eq!(api.too_many(), 0);
    assert_output(&api, "in-0", "text/plain", b"hello");
    assert_error(&api, "in-1", "EchoError", r#"boom "quoted" \ done"#);
    assert_output(&api, "in-2", "text/plain", b"slept 50");
    assert_output(&api, "in-3", "application/x-custom", binary);
    assert_output(&api, "in-4", "text/plain", b"from-the-env");
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "container-1".to_owned());
    assert_output(&api, "in-5", "text/plain", host.as_bytes());
    assert_error(
        &api,
        "in-6",
        "EchoError",
        "environment variable ECHO_UNSET_VAR is not set",
    );
    // Each of the 3 workers asked once more and got 410.
    assert_eq!(api.requests_to("/v1/inputs/next").len(), inputs.len() + 3);
}

#[test]
fn echo_runtime_reports_a_failed_setup_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeRuntimeApi::start(dir.path(), &[("text/plain", b"hello")], 1, 1);
    let bin = echo_runtime();
    let mut cmd = runtime_command(&[bin.to_str().expect("utf-8 path")], &api, 1);
    cmd.env("ECHO_INIT_ERROR", "the model \"m\" is missing");
    let status = wait_exit(&mut cmd.spawn().expect("spawn"), EXIT_WITHIN);
    assert_eq!(status.code(), Some(1));
    let all = api.requests();
    assert_eq!(all.len(), 1, "only the init error: {all:?}");
    assert_eq!(all[0].path, "/v1/init/error");
    let json: serde_json::Value = serde_json::from_slice(&all[0].body).expect("JSON");
    assert_eq!(json["type"], "EchoInitError");
    assert_eq!(json["message"], "the model \"m\" is missing");
}

#[test]
fn echo_runtime_exit_input_crashes_without_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeRuntimeApi::start(dir.path(), &[("text/plain", b"exit:3")], 1, 1);
    let bin = echo_runtime();
    let mut cmd = runtime_command(&[bin.to_str().expect("utf-8 path")], &api, 1);
    let status = wait_exit(&mut cmd.spawn().expect("spawn"), EXIT_WITHIN);
    assert_eq!(status.code(), Some(3));
    let posts: Vec<_> = api
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1/inputs/in-"))
        .collect();
    assert!(posts.is_empty(), "no answer: {posts:?}");
}

#[test]
fn echo_runtime_says_what_is_wrong_outside_a_container() {
    let bin = echo_runtime();
    let out = Command::new(&bin)
        .env_remove("GANTRY_RUNTIME_API")
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("GANTRY_RUNTIME_API is not set"), "{stderr}");

    let out = Command::new(&bin)
        .env("GANTRY_RUNTIME_API", "/nonexistent/runtime.sock")
        .output()
        .expect("spawn");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("/nonexistent/runtime.sock does not exist"),
        "{stderr}"
    );
}

/// runtime.sh under each POSIX shell here (dash's `sh`, busybox's `sh`).
#[test]
fn runtime_sh_echoes_fails_and_exits_0_when_drained() {
    if !have_curl() {
        eprintln!("skipped: runtime.sh needs curl, and this host has none");
        return;
    }
    let script = runtime_sh();
    let script = script.to_str().expect("utf-8 path");
    let mut shells = vec![vec!["sh", script]];
    if Command::new("busybox")
        .arg("true")
        .status()
        .is_ok_and(|s| s.success())
    {
        shells.push(vec!["busybox", "sh", script]);
    }
    for shell in shells {
        let dir = tempfile::tempdir().expect("tempdir");
        let inputs: &[(&str, &[u8])] = &[
            ("text/plain", b"hello"),
            ("text/plain", br#"fail:boom "quoted" \ done"#),
            ("application/json", br#"{"a": [1, 2]}"#),
        ];
        let api = FakeRuntimeApi::start(dir.path(), inputs, 1, 1);
        let mut cmd = runtime_command(&shell, &api, 1);
        let status = wait_exit(&mut cmd.spawn().expect("spawn runtime.sh"), EXIT_WITHIN);
        assert_eq!(status.code(), Some(0), "{shell:?}: {:?}", api.requests());
        assert_ready_first(&api);
        assert_output(&api, "in-0", "text/plain", b"hello");
        assert_error(&api, "in-1", "EchoError", r#"boom "quoted" \ done"#);
        assert_output(&api, "in-2", "application/json", br#"{"a": [1, 2]}"#);
    }
}

/// The image rootfs carries both runtimes, and the static binary runs in busybox with no libc
/// (chrooted, as root; it says its socket is missing, which proves it ran).
#[test]
fn echo_rootfs_carries_the_runtimes_and_the_binary_runs_without_libc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rootfs = dir.path().join("rootfs");
    echo_rootfs(&rootfs);
    for f in ["app/runtime", "app/runtime.sh"] {
        let meta = std::fs::metadata(rootfs.join(f)).expect(f);
        assert!(
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o111 != 0,
            "{f} is executable"
        );
    }
    assert!(
        !rootfs.join("lib").exists() && !rootfs.join("lib64").exists(),
        "no libc"
    );
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped the chroot run: needs root");
        return;
    }
    let out = Command::new("chroot")
        .arg(&rootfs)
        .arg("/app/runtime")
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("GANTRY_RUNTIME_API", "/run/gantry/runtime.sock")
        .output()
        .expect("chroot");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/run/gantry/runtime.sock does not exist"),
        "{stderr}"
    );
    import_into_an_agent(dir.path(), &rootfs);
    oci_layout_for_a_registry(dir.path(), &rootfs);
}

/// `gantry-agent image import` takes the rootfs as image `echo` (`echo:latest`).
fn import_into_an_agent(dir: &Path, rootfs: &Path) {
    let mut agent = Command::new(gantry_tests::binary("gantry-agent"));
    agent
        .env("GANTRY_STATE_DIR", dir.join("agent"))
        .env("GANTRY_CONFIG", dir.join("agent/agent.toml"));
    import_echo(agent, rootfs);
    let out = Command::new(gantry_tests::binary("gantry-agent"))
        .env("GANTRY_STATE_DIR", dir.join("agent"))
        .env("GANTRY_CONFIG", dir.join("agent/agent.toml"))
        .args(["image", "list"])
        .output()
        .expect("image list");
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.lines().any(|l| l.starts_with("echo:latest ")),
        "{list}"
    );
}

/// docs/functions.md shows runtime.sh inline: it must be the script as it is.
#[test]
fn docs_show_runtime_sh_verbatim() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/functions.md");
    let docs = std::fs::read_to_string(&docs).expect("docs/functions.md");
    let script = std::fs::read_to_string(runtime_sh()).expect("examples/runtime.sh");
    assert!(
        docs.contains(&format!("```sh\n{script}```")),
        "docs/functions.md's shell example differs from examples/runtime.sh: copy it again"
    );
}

/// [`oci_layout`] makes an image skopeo can push, with the runtime as its command.
fn oci_layout_for_a_registry(dir: &Path, rootfs: &Path) {
    let layout = oci_layout(rootfs, dir, &["/app/runtime"]);
    let out = Command::new("skopeo")
        .args(["inspect", "--config"])
        .arg(format!("oci:{}:v1", layout.display()))
        .output()
        .expect("skopeo inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config: serde_json::Value = serde_json::from_slice(&out.stdout).expect("image config");
    assert_eq!(
        config["config"]["Cmd"],
        serde_json::json!(["/app/runtime"]),
        "{config}"
    );
}

/// The rest of the agent, as the real runtime API server sees it: what it reported.
#[derive(Debug)]
enum Seen {
    Event(gantry_shared::protocol::Event),
    Stop(gantry_agent::invoke::StopReason),
}

struct Recorder(tokio::sync::mpsc::Sender<Seen>);

impl gantry_agent::invoke::Container for Recorder {
    fn event(&self, event: gantry_shared::protocol::Event) {
        let _ = self.0.try_send(Seen::Event(event));
    }
    fn stop(&self, reason: gantry_agent::invoke::StopReason) {
        let _ = self.0.try_send(Seen::Stop(reason));
    }
}

/// The agent's runtime API (`gantry_agent::invoke`) on its real socket, for one container.
struct RealApi {
    _dir: tempfile::TempDir,
    invoke: gantry_agent::invoke::Invoke,
    server: std::sync::Arc<gantry_agent::invoke::FunctionServer>,
    seen: tokio::sync::mpsc::Receiver<Seen>,
    env: Vec<(String, String)>,
}

impl RealApi {
    async fn open(max_inputs: u32) -> Self {
        use gantry_shared::{AttemptRef, Generation, Owner, WarmId};
        let dir = tempfile::tempdir().expect("tempdir");
        let config = gantry_agent::invoke::InvokeConfig::new(dir.path().join("invoke"));
        let invoke =
            gantry_agent::invoke::Invoke::new(config, tokio_util::sync::CancellationToken::new());
        let attempt = AttemptRef {
            owner: Owner::Function(WarmId::new("w-echo").expect("warm id")),
            generation: Generation(1),
        };
        let id = attempt.owner.container_id(attempt.generation).expect("id");
        let runtime = gantry_shared::protocol::FunctionRuntime {
            max_inputs,
            startup_timeout_ms: 30_000,
            timeout_ms: 60_000,
            web: None,
        };
        let (tx, seen) = tokio::sync::mpsc::channel(64);
        let server = invoke
            .open(&id, attempt, &runtime, std::sync::Arc::new(Recorder(tx)))
            .expect("open the runtime API");
        server.started().await;
        // What the container gets, with the socket where it is on the host.
        let mut env = gantry_agent::invoke::container_env(&runtime);
        for (k, v) in &mut env {
            if k == "GANTRY_RUNTIME_API" {
                *v = server.socket().display().to_string();
            }
        }
        Self {
            _dir: dir,
            invoke,
            server,
            seen,
            env,
        }
    }

    async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(30), self.seen.recv())
            .await
            .expect("the runtime API reported something in time")
            .expect("recorder open")
    }

    fn spawn(&self, extra: &[(&str, &str)]) -> tokio::process::Child {
        self.spawn_program(&[echo_runtime().to_str().expect("utf-8 path")], extra)
    }

    fn spawn_program(&self, argv: &[&str], extra: &[(&str, &str)]) -> tokio::process::Child {
        let mut cmd = tokio::process::Command::new(argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(self.env.iter().cloned());
        cmd.envs(extra.iter().copied()).kill_on_drop(true);
        cmd.spawn().expect("spawn echo-runtime")
    }

    /// The answers queued for the coordinator, waiting up to 30 s for `n` of them.
    async fn outputs(&self, n: usize) -> Vec<gantry_agent::invoke::OutputReport> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let all: Vec<_> = (self.invoke.outputs())
                .pending(&std::collections::HashSet::new(), 100)
                .into_iter()
                .filter_map(|(_, r)| match r {
                    gantry_agent::invoke::Report::Output(o) => Some(o),
                    gantry_agent::invoke::Report::Chunk(_) => None,
                })
                .collect();
            if all.len() >= n || tokio::time::Instant::now() > deadline {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn exit_code(child: &mut tokio::process::Child) -> Option<i32> {
    tokio::time::timeout(EXIT_WITHIN, child.wait())
        .await
        .expect("the runtime exited in time")
        .expect("wait")
        .code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_runtime_against_the_agents_runtime_api() {
    use gantry_shared::calls::{FailureCause, InputResult, LeasedInput, Payload};
    use gantry_shared::protocol::Event;
    use gantry_shared::{CallId, InputId};

    let mut api = RealApi::open(2).await;
    let mut child = api.spawn(&[]);
    assert!(matches!(
        api.next_seen().await,
        Seen::Event(Event::Ready { .. })
    ));

    let call = CallId::new("fc-1").expect("call id");
    let deadline_ms = gantry_shared::now_ms() + 60_000;
    let binary: &[u8] = &[0, 159, 146, 150, b'\r', b'\n'];
    let inputs: [(&str, &[u8]); 4] = [
        ("text/plain", b"hello"),
        ("text/plain", b"fail:boom"),
        ("text/plain", b"sleep:50"),
        ("application/x-custom", binary),
    ];
    for (i, (ct, body)) in inputs.iter().enumerate() {
        let input = LeasedInput {
            id: InputId::of(&call, i as u32),
            call: call.clone(),
            attempt: 1,
            deadline_ms,
            payload: Payload::new(*ct, body.to_vec()),
        };
        api.server.deliver(vec![input]).expect("deliver");
    }
    let outputs = api.outputs(inputs.len()).await;
    assert_eq!(outputs.len(), inputs.len(), "{outputs:?}");
    let result = |i: u32| {
        let id = InputId::of(&call, i);
        let found = outputs.iter().find(|o| o.input == id);
        found.map(|o| o.result.clone()).expect("an answer")
    };
    assert_eq!(
        result(0),
        InputResult::Output(Payload::new("text/plain", b"hello".to_vec()))
    );
    match result(1) {
        InputResult::Error(e) => {
            assert_eq!(
                (e.cause, e.error_type.as_str()),
                (FailureCause::User, "EchoError")
            );
            assert_eq!(e.message, "boom");
        }
        other => panic!("fail:boom answered {other:?}"),
    }
    assert_eq!(
        result(2),
        InputResult::Output(Payload::new("text/plain", b"slept 50".to_vec()))
    );
    assert_eq!(
        result(3),
        InputResult::Output(Payload::new("application/x-custom", binary.to_vec()))
    );

    api.server.drain(Duration::from_secs(30));
    assert_eq!(
        exit_code(&mut child).await,
        Some(0),
        "exit 0 after the drain"
    );
    api.server.shutdown(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_runtime_streams_chunks_before_its_answer() {
    use gantry_agent::invoke::Report;
    use gantry_shared::calls::{InputResult, LeasedInput, Payload};
    use gantry_shared::{CallId, InputId};

    let mut api = RealApi::open(1).await;
    let mut child = api.spawn(&[]);
    assert!(matches!(api.next_seen().await, Seen::Event(_)), "ready");
    let call = CallId::new("fc-3").expect("call id");
    let input = LeasedInput {
        id: InputId::of(&call, 0),
        call: call.clone(),
        attempt: 1,
        deadline_ms: gantry_shared::now_ms() + 60_000,
        payload: Payload::text("stream:3"),
    };
    api.server.deliver(vec![input]).expect("deliver");
    api.outputs(1).await;
    let reports: Vec<Report> = (api.invoke.outputs())
        .pending(&std::collections::HashSet::new(), 100)
        .into_iter()
        .map(|(_, r)| r)
        .collect();
    let chunks: Vec<(u64, Payload)> = reports
        .iter()
        .filter_map(|r| match r {
            Report::Chunk(c) => Some((c.seq, c.payload.clone())),
            Report::Output(_) => None,
        })
        .collect();
    let want: Vec<(u64, Payload)> = (0..3)
        .map(|n| (n, Payload::text(&format!("chunk-{n}"))))
        .collect();
    assert_eq!(chunks, want);
    match reports.last() {
        Some(Report::Output(o)) => {
            assert_eq!(o.result, InputResult::Output(Payload::text("streamed 3")))
        }
        other => panic!("the answer comes last: {other:?}"),
    }
    api.server.drain(Duration::from_secs(30));
    assert_eq!(exit_code(&mut child).await, Some(0));
    api.server.shutdown(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_runtime_init_error_against_the_agents_runtime_api() {
    use gantry_shared::protocol::Event;

    let mut api = RealApi::open(1).await;
    let mut child = api.spawn(&[("ECHO_INIT_ERROR", "no model here")]);
    match api.next_seen().await {
        Seen::Event(Event::InitFailed { message, .. }) => {
            assert!(message.contains("no model here"), "{message}")
        }
        other => panic!("expected InitFailed, saw {other:?}"),
    }
    match api.next_seen().await {
        Seen::Stop(gantry_agent::invoke::StopReason::InitFailed { message }) => {
            assert!(message.contains("no model here"), "{message}")
        }
        other => panic!("expected a stop for the failed setup, saw {other:?}"),
    }
    assert_eq!(exit_code(&mut child).await, Some(1));
    api.server.shutdown(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_sh_against_the_agents_runtime_api() {
    use gantry_shared::calls::{InputResult, LeasedInput, Payload};
    use gantry_shared::protocol::Event;
    use gantry_shared::{CallId, InputId};

    if !have_curl() {
        eprintln!("skipped: runtime.sh needs curl, and this host has none");
        return;
    }
    let mut api = RealApi::open(1).await;
    let script = runtime_sh();
    let mut child = api.spawn_program(&["sh", script.to_str().expect("utf-8 path")], &[]);
    assert!(matches!(
        api.next_seen().await,
        Seen::Event(Event::Ready { .. })
    ));
    let call = CallId::new("fc-2").expect("call id");
    for (i, body) in ["hello", "fail:boom"].iter().enumerate() {
        let input = LeasedInput {
            id: InputId::of(&call, i as u32),
            call: call.clone(),
            attempt: 1,
            deadline_ms: gantry_shared::now_ms() + 60_000,
            payload: Payload::new("text/plain", body.as_bytes().to_vec()),
        };
        api.server.deliver(vec![input]).expect("deliver");
    }
    let outputs = api.outputs(2).await;
    let result = |i: u32| {
        let id = InputId::of(&call, i);
        let found = outputs.iter().find(|o| o.input == id);
        found.map(|o| o.result.clone()).expect("an answer")
    };
    assert_eq!(
        result(0),
        InputResult::Output(Payload::new("text/plain", b"hello".to_vec()))
    );
    assert!(
        matches!(result(1), InputResult::Error(e) if e.error_type == "EchoError" && e.message == "boom")
    );
    api.server.drain(Duration::from_secs(30));
    assert_eq!(
        exit_code(&mut child).await,
        Some(0),
        "exit 0 after the drain"
    );
    api.server.shutdown(true).await;
}
